"""Differential privacy for distribution matching: per-example clipping, Gaussian noise and its accounting.

The private quantity in DM is the mean embedding of each class's real images; everything else (the random
networks, the augmentation draws, the synthetic images) is independent of the private data.  Each iteration
releases, for every class c, the sum of the clipped embeddings of a Poisson sample of that class (every image of
class c taken independently with probability q_c = min(1, batch_real / n_c)) plus Gaussian noise N(0, (sigma*C)^2)
per coordinate.  An image belongs to one class and its clipped embedding has L2 norm <= C, so adding or removing
one image changes the released per-class sums by at most C: every iteration is one sampled Gaussian mechanism
with sensitivity C and noise multiplier sigma, and the run is `iterations` of them, composed.

Accounting uses opacus' Renyi-DP accountant for the Poisson-subsampled Gaussian mechanism, with the worst-case
rate q = max_c q_c = batch_real / (smallest class size).  Assumptions, stated because they bound what is claimed:
  - neighbouring datasets differ by adding or removing one image (the usual DP-SGD relation);
  - the class sizes n_c (the label histogram) are public: the sampling rates and the expected counts that turn
    noisy sums into means are computed from them;
  - the synthetic images do not start from real images (DP distillation starts from noise).

The noise and the Poisson sampling come from the operating system's cryptographically secure random source
(`OsRandom`, reading `os.urandom`), never from the run's seed: the seed is public (it is in the set's metadata),
and noise recomputable from it would let anyone who knows all but one record compare the candidate outputs.
So a DP run is not bitwise reproducible; everything else in it (networks, augmentation) stays seeded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fedcl.data.sampling import ClassIndex

#: Renyi orders searched for the tightest (epsilon, delta) conversion: opacus' default grid extended to 256,
#: since small sampling rates and few steps reach their best bound at high orders.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 257))


def clip_rows(values: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale every row of `values` down to L2 norm <= max_norm (rows already inside are left unchanged)."""
    norms = values.norm(dim=1, keepdim=True)
    return values * (max_norm / norms.clamp(min=max_norm))


def sampling_rates(counts: torch.Tensor, per_class: int) -> torch.Tensor:
    """Poisson sampling rate of each class so that it expects `per_class` images: min(1, per_class / n_c)."""
    return (per_class / counts.clamp(min=1).double()).clamp(max=1.0) * (counts > 0)


class OsRandom:
    """Uniform and Gaussian draws from `os.urandom` (the OS's cryptographically secure generator), for DP noise
    and sampling: unlike a seeded torch.Generator, nothing public determines them."""

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """float64 draws in (0, 1): 53 random bits each, offset by half a step so 0 never occurs."""
        count = math.prod(shape)
        words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64) if count else \
            torch.empty(0, dtype=torch.int64)
        bits = (words >> 11) & ((1 << 53) - 1)
        return ((bits.double() + 0.5) / 2.0**53).reshape(shape)

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal float64 draws (Box-Muller on two uniform draws each)."""
        count = math.prod(shape)
        u = self.uniform((2, count))
        return ((-2 * u[0].log()).sqrt() * torch.cos(2 * math.pi * u[1])).reshape(shape)


def poisson_sample(index: ClassIndex, rates: torch.Tensor,
                   random: OsRandom | torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Take every sample of class c independently with probability rates[c], with draws from `random` (an
    OsRandom for DP; a torch.Generator only where the sample needs no privacy, as in tests).

    Returns (indices, classes) grouped by class, like `ClassIndex.sample`; the batch size is random.
    """
    if isinstance(random, OsRandom):
        keys = random.uniform(tuple(index.table.shape))
    else:
        keys = torch.rand(index.table.shape, generator=random, dtype=torch.float64)
    keep = (keys < rates.unsqueeze(1)) & (index.table >= 0)
    classes = torch.arange(index.n_classes).unsqueeze(1).expand_as(index.table)
    return index.table[keep], classes[keep]


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to opacus' search tolerance) whose `steps` sampled Gaussian steps at
    `sample_rate` spend at most (epsilon, delta)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", alphas=ALPHAS))


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent at `delta` by `steps` sampled Gaussian steps (opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))


@dataclass(frozen=True)
class PrivacyBudget:
    """A target (epsilon, delta) and the clip norm for DP distribution matching.

    epsilon: total privacy budget of the whole run (> 0).  delta: its failure probability (0 < delta < 1; keep
    it below 1 / dataset size).  clip: L2 bound C on each real embedding; None picks sqrt(D) / 2 for embeddings
    of dimension D (a property of the network alone: the instance-normalised ConvNet's embeddings have norm
    about 0.56 sqrt(D) whatever the image, so this clips them slightly).
    """

    epsilon: float
    delta: float = 1e-5
    clip: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"DP epsilon must be a finite number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"DP delta must lie strictly between 0 and 1, got {self.delta}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"DP clip norm must be a finite number > 0, got {self.clip}")

    def mechanism(self, counts: torch.Tensor, per_class: int, steps: int, dim: int) -> GaussianClassSums:
        """The calibrated mechanism for classes of sizes `counts`, `per_class` expected samples, `steps` releases
        of sums of `dim`-dimensional embeddings."""
        if steps < 1:
            raise ValueError("DP distillation needs at least one iteration")
        rates = sampling_rates(counts, per_class)
        sample_rate = float(rates.max())
        sigma = calibrate_noise(self.epsilon, self.delta, sample_rate, steps)
        clip = self.clip if self.clip is not None else math.sqrt(dim) / 2
        return GaussianClassSums(self, counts, rates, dim, clip, sigma, sample_rate, steps,
                                 spent_epsilon(sigma, sample_rate, steps, self.delta))


@dataclass(frozen=True)
class GaussianClassSums:
    """The calibrated mechanism: class sizes, Poisson sampling rates, embedding size and clip norm, noise
    multiplier and the budget it spends."""

    budget: PrivacyBudget
    counts: torch.Tensor
    rates: torch.Tensor
    dim: int
    clip: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    #: Source of the noise and of the Poisson sampling: the OS's secure generator, never the run's seed.
    random: OsRandom = field(default_factory=OsRandom, compare=False)

    def noisy_means(self, sums: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Means from clipped per-class sums (rows = present classes): add N(0, (sigma C)^2) drawn from the OS's
        secure generator, divide by the expected count q_c n_c."""
        noise = self.random.normal(tuple(sums.shape)).float() * (self.noise_multiplier * self.clip)
        expected = (self.rates[present] * self.counts[present]).float().unsqueeze(1)
        return (sums + noise.to(sums.device, sums.dtype)) / expected.to(sums.device)

    def report(self) -> dict[str, Any]:
        """What the run spent, for the set's metadata and report.json."""
        return {"epsilon": self.epsilon, "delta": self.budget.delta, "target_epsilon": self.budget.epsilon,
                "noise_multiplier": self.noise_multiplier, "clip": self.clip,
                "sample_rate": self.sample_rate, "steps": self.steps, "accountant": "opacus RDP",
                "sampling": "Poisson per class, rate min(1, batch_real / n_c); worst-case rate accounted",
                "randomness": "os.urandom (not reproducible from the seed)"}
