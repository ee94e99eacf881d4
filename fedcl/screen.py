"""Poisoning screen: find the synthetic sets in a group that disagree with the robust centre of the others.

A federated server receives synthetic sets from clients it cannot check against real data.  A poisoned set
(labels flipped, images replaced by noise, another client's classes relabelled) shows up in *what its images look
like per class*: under a few fixed, seeded random ConvNets (the embedding networks DM itself matches), the mean
embedding of a poisoned set's class c lies far from where the other clients' class-c means lie.

`EmbeddingScreen` scores every set by that distance:

1. for each network k and class c, the class-mean embedding m[s, c, k] of every set s that holds class c;
2. the robust centre of class c under network k: the coordinate-wise median of m[., c, k] over the sets holding c
   (only when at least `min_peers` sets hold it: a median of two says nothing);
3. the set's distance to that centre divided by the median distance of all holders (a MAD-style scale, so the
   score is unit-free and honest sets score about 1);
4. a class score per set: that ratio averaged over the networks;
5. the set's score: the median of its class scores.

A set whose score exceeds `threshold` is an outlier.  The median over classes, not the mean, because a label-flipped
or noise set is off in every class it holds while an honest client under label skew may hold a class with only a
handful of real images, whose distilled class mean is noisy: one odd class must not get an honest set refused.  The
price: a client that poisons fewer than half of its classes is not caught.

The median centre of a class keeps its meaning while fewer than half of the holders of that class are poisoned;
beyond that no screen without trusted data can tell who is honest.

Torch only (no Flower): the strategies in `strategies/` call it on the sets of a round and drop the outliers.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedcl.models import create_model
from fedcl.runtime import seeded
from fedcl.synthetic import SyntheticSet

#: Names accepted by `create_screen` (and the strategies' `screen` option).
SCREENS = ("none", "embedding")


@dataclass(frozen=True)
class ScreenResult:
    """Verdict on a group of sets: a score per set (NaN when it had no comparable peers), the indices of the
    outliers and, for each outlier, the reason to log."""

    scores: list[float]
    outliers: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)

    def kept(self) -> list[int]:
        """Indices of the sets that passed."""
        return [i for i in range(len(self.scores)) if i not in self.outliers]


@dataclass(frozen=True)
class EmbeddingScreen:
    """Flag sets whose per-class mean embeddings under random ConvNets lie far from the other sets' median.

    n_nets: how many seeded random networks embed the images.  width / depth: their size.  threshold: the score
    (median over the set's classes of the distance to the class median, in median distances) above which a set is
    an outlier.  min_peers: the fewest sets that must hold a class for it to count.  seed: the networks'
    initialisation, by default drawn from the operating system's secret randomness (`secrets`): a client knows
    the run's seed (every instruction carries it), and networks it could recompute would let it craft a set that
    scores well under exactly these networks.

    In a group of at least `min_peers` sets, a set whose score is NaN (none of its classes comparable, or
    embeddings that are not finite) is refused: it cannot be shown to agree with anyone.  A smaller group is not
    judged at all (every score NaN, every set kept).

    Depth 2 keeps some spatial resolution on 8x8 digits (at depth 3 the feature maps are 1x1 and the margin between
    honest and poisoned sets was much smaller).  Threshold 2.5 sits in the gap measured with
    `simulations/bench_poison.py` (10 clients, DM sets of 10 images per class, clients 0 and 1 attacking): honest
    sets scored 0.83-1.32 and the attackers 3.54-4.08 (digits, Dirichlet 0.5), 4.28-4.77 (digits, IID) and
    6.79-8.43 (Fashion-MNIST, Dirichlet 0.5; label-flipped and noise sets).  With the mean over classes (the
    earlier rule) an honest Fashion-MNIST client scored 3.22 and was refused: 3 of its 8 classes scored 4.6-8.1,
    the median over its classes 1.32.
    """

    n_nets: int = 3
    width: int = 64
    depth: int = 2
    threshold: float = 2.5
    min_peers: int = 3
    seed: int = field(default_factory=lambda: secrets.randbits(31))

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"screen threshold must be > 0 (honest sets score about 1), got {self.threshold}")

    def __call__(self, sets: Sequence[SyntheticSet]) -> ScreenResult:
        """Score every set against the others; all sets must share image shape and number of classes."""
        if len(sets) < self.min_peers:
            return ScreenResult(scores=[float("nan")] * len(sets))
        scores = self.class_scores(sets).nanquantile(0.5, dim=1).tolist()  # NaN: no comparable class
        outliers = [i for i, s in enumerate(scores) if not s <= self.threshold]  # NaN included
        reasons = {i: f"screened out as an outlier: embedding score {scores[i]:.2f} > threshold {self.threshold} "
                      f"(median over its classes of the distance of its class mean to the other clients' median, "
                      f"in median distances)" if scores[i] == scores[i] else
                      "screened out: no embedding score (no class comparable with enough peers, or non-finite "
                      "embeddings)"
                   for i in outliers}
        return ScreenResult(scores=scores, outliers=outliers, reasons=reasons)

    def class_scores(self, sets: Sequence[SyntheticSet]) -> torch.Tensor:
        """(sets, classes): each class's distance ratio averaged over the networks; NaN where a set lacks the class
        or too few sets hold it."""
        return self._distance_ratios(sets).mean(dim=2)

    def _distance_ratios(self, sets: Sequence[SyntheticSet]) -> torch.Tensor:
        """(sets, classes, nets): distance of each class mean to the classes' median, over the median distance."""
        n_classes = sets[0].meta.n_classes
        means = self._class_means(sets, n_classes)  # (sets, classes, nets, dim), NaN where a set lacks the class
        ratios = torch.full(means.shape[:3], float("nan"))
        for c in range(n_classes):
            holders = [s for s in range(len(sets)) if not torch.isnan(means[s, c, 0, 0])]
            if len(holders) < self.min_peers:
                continue
            held = means[holders, c]  # (holders, nets, dim)
            distance = (held - held.median(dim=0).values).norm(dim=-1)  # (holders, nets)
            scale = distance.median(dim=0).values.clamp(min=1e-12)
            ratios[holders, c] = distance / scale
        return ratios

    def _class_means(self, sets: Sequence[SyntheticSet], n_classes: int) -> torch.Tensor:
        """Mean embedding of each set's classes under each network: (sets, classes, nets, dim), NaN if absent."""
        image_shape = sets[0].image_shape
        per_net = []
        for k in range(self.n_nets):
            with seeded(self.seed * 7919 + k):
                net = create_model("convnet", image_shape, n_classes, width=self.width, depth=self.depth).eval()
            with torch.no_grad():
                per_net.append(torch.stack([_class_means(net.embed(d.images), d.hard_labels, n_classes)
                                            for d in (s.decode() for s in sets)]))
        return torch.stack(per_net, dim=2)


def _class_means(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, dim) mean embedding per class; rows of classes without images are NaN."""
    sums = torch.zeros(n_classes, embeddings.shape[1]).index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=n_classes).unsqueeze(1).float()
    return sums / counts  # 0 / 0 = NaN marks an absent class


def create_screen(name: str, seed: int | None = None,
                  threshold: float = EmbeddingScreen.threshold) -> EmbeddingScreen | None:
    """The screen called `name` ("none" -> None, "embedding" -> EmbeddingScreen(seed=seed, threshold=threshold)).

    seed None (the default, what servers use) draws the networks' seed from secret randomness; pass one only to
    reproduce a measurement."""
    if name not in SCREENS:
        raise ValueError(f"unknown screen {name!r}; choose one of {list(SCREENS)}")
    if name == "none":
        return None
    return EmbeddingScreen(threshold=threshold) if seed is None else EmbeddingScreen(seed=seed, threshold=threshold)
