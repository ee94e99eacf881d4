"""Distribution Matching (DM, Zhao & Bilen, WACV 2023), written for speed.

Every iteration samples a freshly initialised network and moves the synthetic images so that, class by class, the
mean embedding of the (augmented) synthetic images matches the mean embedding of a batch of (identically
augmented) real images:  loss = sum_c || mean_emb(real_c) - mean_emb(syn_c) ||^2.

Unlike the reference loop (one forward per class, real embeddings computed with autograd and detached), all classes
go through the network in one batch: real images without autograd, in cache-sized chunks, reduced to class means
with `index_add_`; the synthetic images in one differentiable pass.  DSA draws one transformation per class and
applies it to that class's real and synthetic images alike, exactly as the reference's per-class seed does.

With `dp_epsilon` set, the real class means are released with differential privacy (`fedcl.privacy`): each class
is Poisson-sampled, every real embedding is clipped to L2 norm C, Gaussian noise N(0, (sigma C)^2) is added to the
per-class sums, and sigma is calibrated so that all iterations together spend at most (dp_epsilon, dp_delta).
Only the real side needs noise: the synthetic images, networks and augmentation draws are not private data.
The synthetic embeddings are clipped to the same bound (no privacy cost) so that both means are of clipped vectors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import ClassVar

import torch

from fedcl.augment import DEFAULT_STRATEGY, DSA
from fedcl.data.sampling import ClassIndex
from fedcl.distill.base import Distiller, DistillResult, ProgressCallback, register
from fedcl.distill.functional import initial_images
from fedcl.models import create_model
from fedcl.privacy import GaussianClassSums, PrivacyBudget, clip_rows, poisson_sample
from fedcl.runtime import CompiledEmbedding, autocast, seeded
from fedcl.runtime import generator as make_generator
from fedcl.synthetic import expand_tiles, pack_tiles


@register
class DistributionMatching(Distiller):
    """Distribution matching.

    iterations: outer iterations, each with a new random network (paper: 20,000).
    lr_img / momentum: SGD on the synthetic pixels (paper: 1.0 / 0.5).
    batch_real: real images per class per iteration (paper: 256).
    init: "real" (random real images of the class) or "noise" (standard normal); default real, noise under DP.
    dsa / dsa_strategy: differentiable siamese augmentation of real and synthetic batches.
    amp: bfloat16 autocast for the forward passes: None (default) on CPUs with native bf16 only, True also on
    CUDA, False never (`fedcl.runtime.amp_enabled`).
    chunk: real images per forward chunk (cache blocking; does not change the loss).
    compile: embed the real chunks through `torch.compile` (`fedcl.runtime.CompiledEmbedding`, about 2x faster on
    CPU after a one-off compilation of some seconds); None (default) turns it on for CPU runs of >= 200 iterations.
    dp_epsilon / dp_delta / dp_clip: differentially private distillation spending at most (dp_epsilon, dp_delta)
    over the whole run, with real embeddings clipped to L2 norm dp_clip (`fedcl.privacy.PrivacyBudget`); off
    (None) by default, which leaves the loop exactly as without these options.  Under DP the noise and sampling
    come from the OS's secure generator (a DP run is not bitwise reproducible), and no checkpoint is written:
    a checkpoint holds a hash of the private data and resumable state, so it is kept only with
    dp_keep_checkpoint=True (with a warning).
    factor: multi-formation factor f: each stored image holds f x f tiles, each a training image upsampled to
    the full size, so f**2 training images per stored image (`fedcl.synthetic.expand_tiles`).
    guide / guide_noise: FedDM-style guidance (Xiong et al., CVPR 2023): with a model's state_dict as `guide`
    (same architecture as model/model_cfg), every iteration embeds with that model, its weights perturbed by
    Gaussian noise of `guide_noise` times each tensor's RMS, instead of a freshly initialised network; a federated
    client passes the global model, so its set carries what that model still gets wrong about the local data.
    Methods that choose their own matching networks (`supports_guide` False) refuse a guide.
    """

    name = "dm"
    supports_factor = True
    #: Whether the method's matching networks can be replaced by a perturbed guide model.
    supports_guide: ClassVar[bool] = True

    def __init__(self, *, iterations: int = 1000, lr_img: float = 1.0, momentum: float = 0.5,
                 batch_real: int = 256, init: str | None = None, dsa: bool = True,
                 dsa_strategy: str = DEFAULT_STRATEGY, amp: bool | None = None, chunk: int = 256,
                 dp_epsilon: float | None = None, dp_delta: float = 1e-5, dp_clip: float | None = None,
                 dp_keep_checkpoint: bool = False, compile: bool | None = None,
                 guide: Mapping[str, torch.Tensor] | None = None, guide_noise: float = 0.05, **base) -> None:
        super().__init__(**base)
        if guide is not None and not self.supports_guide:
            raise ValueError(f"{self.name} chooses its own matching networks and takes no guide model")
        if guide_noise < 0:
            raise ValueError(f"guide_noise must be >= 0, got {guide_noise}")
        self.guide = None if guide is None else {k: v.detach().cpu() for k, v in guide.items()}
        self.guide_noise = guide_noise
        self.compile = self.device.type == "cpu" and iterations >= 200 if compile is None else bool(compile)
        self._compiled = None
        self.privacy = None if dp_epsilon is None else PrivacyBudget(dp_epsilon, dp_delta, dp_clip)
        if self.privacy is not None and self.checkpoint_dir is not None:
            if not dp_keep_checkpoint:
                if self.resume:
                    raise ValueError("a DP run keeps no checkpoint to resume from; pass dp_keep_checkpoint=True "
                                     "to write one (it holds a hash of the private data)")
                self.checkpoint_dir = None
            else:
                warnings.warn("dp_keep_checkpoint=True: the checkpoint of a DP run holds a hash of the private "
                              "data and resumable state; do not release it with the synthetic set", stacklevel=2)
        init = init or ("real" if self.privacy is None else "noise")
        if init not in ("real", "noise"):
            raise ValueError(f"init must be 'real' or 'noise', got {init!r}")
        if init == "real" and self.privacy is not None:
            raise ValueError("DP distillation must start from noise (init='real' would copy private images)")
        self.iterations, self.lr_img, self.momentum = iterations, lr_img, momentum
        self.batch_real, self.init, self.amp, self.chunk = batch_real, init, amp, chunk
        self.augment = DSA(dsa_strategy) if dsa else None

    def _distill(self, images, labels, ipc, n_classes, callback: ProgressCallback | None) -> DistillResult:
        gen = make_generator(self.seed)
        index = ClassIndex(labels, n_classes)
        present = index.present
        images = images.to(self.device)
        syn, syn_labels = self.initial_images(images, index, ipc, gen)
        syn.requires_grad_(True)
        optimizer = torch.optim.SGD([syn], lr=self.lr_img, momentum=self.momentum)
        # Group id of each class (its row in the augmentation draw and in the class-mean tables).
        group_of = torch.full((n_classes,), -1, dtype=torch.long)
        group_of[present] = torch.arange(len(present))
        tiles = self.factor * self.factor
        train_labels = syn_labels.repeat_interleave(tiles)
        train_groups = group_of[train_labels]
        mechanism = None if self.privacy is None else self.privacy.mechanism(
            index.counts, self.batch_real, self.iterations, self.embedding_dim(images, n_classes))
        pool = self.pool_tensors(tuple(images.shape[1:]), n_classes)
        state = self.loop_state(images, labels, ipc, n_classes, gen, {"images": syn, **pool}, {"images": optimizer})
        real_labels = labels.to(self.device)
        self.prepare(images, real_labels, state)
        bar = self.progress_bar(state)
        for it in bar:
            x = expand_tiles(syn, self.factor)
            loss = self.step(images, index, x, train_groups, group_of, gen, self.seed * 1_000_003 + it, mechanism,
                             train_labels=train_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.after_step(it, syn, images, real_labels, gen)
            self.record(state, float(loss.detach()), it, bar, callback)
        losses = state.losses
        return DistillResult(syn.detach(), syn_labels, factor=self.factor, extra={
            "iterations": self.iterations, "batch_real": self.batch_real, "init": self.init,
            "dsa": self.augment is not None, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, **self.describe(),
            **({} if mechanism is None else {"dp": mechanism.report()})})

    def new_model(self, in_shape: tuple[int, int, int], n_classes: int, seed: int) -> torch.nn.Module:
        """The base's network, except that without a guide a ConvNet pools no further than a 2x2 feature map
        (`matching_depth`): pooled to 1x1 under instance norm, its embedding carries almost no signal, and DM
        from noise on 8x8 digits stays at chance (depth 3) where depth 2 learns."""
        if self.model != "convnet" or self.guide is not None:
            return super().new_model(in_shape, n_classes, seed)
        depth = matching_depth(in_shape, self.model_cfg.get("depth", 3))
        with seeded(seed):
            net = create_model(self.model, in_shape, n_classes, **{**self.model_cfg, "depth": depth})
        return net.to(self.device, memory_format=torch.channels_last)

    # ------------------------------------------------------------------ hooks of the DM family (IDM, DANCE)
    def pool_tensors(self, in_shape: tuple[int, int, int], n_classes: int) -> dict[str, torch.Tensor]:
        """Extra loop tensors that a checkpoint must carry (a model pool); plain DM has none."""
        return {}

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, state) -> None:
        """Work before the first iteration (e.g. training a model pool), done when `state.start` is 0: a resumed
        run has its pool restored from the checkpoint."""

    def match_networks(self, in_shape: tuple[int, int, int], n_classes: int, net_seed: int,
                       gen: torch.Generator) -> list[torch.nn.Module]:
        """The networks whose embeddings are matched this iteration: DM's one freshly initialised network, or the
        guide model perturbed afresh (seeded by `net_seed`)."""
        net = self.new_model(in_shape, n_classes, net_seed)
        if self.guide is not None:
            perturb_to(net, self.guide, self.guide_noise, net_seed)
        return [net]

    def regulariser(self, net: torch.nn.Module, emb: torch.Tensor, x: torch.Tensor,
                    train_labels: torch.Tensor) -> torch.Tensor | None:
        """An extra loss on the augmented synthetic images `x` and their embeddings `emb` (None: none)."""
        return None

    def after_step(self, it: int, syn: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   gen: torch.Generator) -> None:
        """Work after the stored images `syn` moved (e.g. training pool networks on the real data)."""

    def describe(self) -> dict:
        """Method-specific facts for the set's metadata."""
        return {"factor": self.factor}

    # ------------------------------------------------------------------ the matching step
    def embedding_dim(self, images: torch.Tensor, n_classes: int) -> int:
        """Size D of the network's embedding for these images (sets the default DP clip norm)."""
        net = self.new_model(tuple(images.shape[1:]), n_classes, self.seed)
        with torch.no_grad():
            return int(net.embed(images[:1].contiguous(memory_format=torch.channels_last)).shape[1])

    def initial_images(self, images: torch.Tensor, index: ClassIndex, ipc: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`ipc` stored starting images per present class (real samples or noise), channels_last, and their
        labels; with factor f, a real start packs f**2 real images of the class into the tiles of each."""
        tiles = self.factor * self.factor
        syn, classes = initial_images(images, index, ipc * tiles, gen, self.init, self.device)
        if tiles > 1:
            syn = pack_tiles(syn, self.factor) if self.init == "real" else syn[::tiles].clone()
            classes = classes[::tiles]
        return syn.contiguous(memory_format=torch.channels_last), classes

    def step(self, images: torch.Tensor, index: ClassIndex, syn: torch.Tensor, syn_groups: torch.Tensor,
             group_of: torch.Tensor, gen: torch.Generator, net_seed: int,
             mechanism: GaussianClassSums | None = None, train_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one iteration on the (decoded) training images `syn`: for every matching network, one
        shared augmentation draw per class and the distance of the class-mean embeddings (real means released
        through the DP `mechanism` when one is given), plus the method's regulariser."""
        loss = torch.zeros((), device=syn.device)
        for net in self.match_networks(tuple(images.shape[1:]), index.n_classes, net_seed, gen):
            net.requires_grad_(False)
            distance, emb, x = self.match(net, images, index, syn, syn_groups, group_of, gen, mechanism)
            extra = None if train_labels is None else self.regulariser(net, emb, x, train_labels)
            loss = loss + distance + (0 if extra is None else extra)
        return loss

    def match(self, net: torch.nn.Module, images: torch.Tensor, index: ClassIndex, syn: torch.Tensor,
              syn_groups: torch.Tensor, group_of: torch.Tensor, gen: torch.Generator,
              mechanism: GaussianClassSums | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DM's distance for one network: (loss, synthetic embeddings, augmented synthetic images)."""
        n_groups = int((group_of >= 0).sum())
        if mechanism is None:
            picks, classes = index.sample(self.batch_real, gen)
        else:
            picks, classes = poisson_sample(index, mechanism.rates, mechanism.random)
        real_groups = group_of[classes]
        draw = self.augment.draw(n_groups, gen) if self.augment is not None else None
        real_mean = self.real_class_means(net, images, picks, real_groups, draw, n_groups, mechanism)
        if mechanism is not None:
            real_mean = mechanism.noisy_means(real_mean, index.present)
        x = syn if draw is None else self.augment.apply(syn, draw, syn_groups)
        with autocast(self.device, self.amp):
            emb = net.embed(x.contiguous(memory_format=torch.channels_last)).float()
        if mechanism is not None:  # compare like with like: the real side's embeddings are clipped
            emb = clip_rows(emb, mechanism.clip)
        syn_mean = group_sums(emb, syn_groups, n_groups) / group_counts(syn_groups, n_groups, emb.device)
        return ((real_mean - syn_mean) ** 2).sum(), emb, x

    def real_embedding(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of a real chunk (no autograd): through the compiled embedding when `compile` is on."""
        if self.compile:
            if self._compiled is None:
                self._compiled = CompiledEmbedding(self.new_model(tuple(x.shape[1:]), net_classes(net), self.seed),
                                                   self.device, self.amp)
            return self._compiled(net, x)
        with autocast(self.device, self.amp):
            return net.embed(x).float()

    @torch.no_grad()
    def real_class_means(self, net: torch.nn.Module, images: torch.Tensor, picks: torch.Tensor,
                         groups: torch.Tensor, draw, n_groups: int,
                         mechanism: GaussianClassSums | None = None) -> torch.Tensor:
        """Mean embedding per group of the sampled real images, without autograd, in chunks that stay in cache.

        With a DP `mechanism`, the sums of the clipped embeddings instead (the mechanism adds noise and divides).
        """
        sums = 0.0 if mechanism is None else torch.zeros(n_groups, mechanism.dim, device=self.device)
        for start in range(0, len(picks), self.chunk):
            idx, grp = picks[start:start + self.chunk], groups[start:start + self.chunk]
            x = images[idx.to(self.device)]
            if draw is not None:
                x = self.augment.apply(x, draw, grp)
            emb = self.real_embedding(net, x.contiguous(memory_format=torch.channels_last))
            if mechanism is not None:
                emb = clip_rows(emb, mechanism.clip)
            sums = sums + group_sums(emb, grp, n_groups)
        return sums if mechanism is not None else sums / group_counts(groups, n_groups, self.device)


def matching_depth(in_shape: tuple[int, int, int], depth: int) -> int:
    """`depth` capped so that a ConvNet's last pooling leaves at least a 2x2 map of an image of `in_shape`."""
    return max(1, min(depth, int(math.log2(min(in_shape[1:]))) - 1))


@torch.no_grad()
def perturb_to(net: torch.nn.Module, state: Mapping[str, torch.Tensor], noise: float, seed: int) -> None:
    """Load `state` into `net`, then add Gaussian noise of `noise` times each parameter tensor's RMS (seeded)."""
    net.load_state_dict(state)
    gen = make_generator(seed)
    for p in net.parameters():
        rms = p.square().mean().sqrt().clamp_min(1e-8)
        p.add_(torch.randn(p.shape, generator=gen).to(p.device) * (noise * rms))


def group_sums(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Row sums of `values` per group id, (n_groups, D)."""
    out = torch.zeros(n_groups, values.shape[1], device=values.device, dtype=values.dtype)
    return out.index_add_(0, groups.to(values.device), values)


def group_counts(groups: torch.Tensor, n_groups: int, device: torch.device) -> torch.Tensor:
    """Members per group as a (n_groups, 1) float column (at least 1, to divide by)."""
    return torch.bincount(groups, minlength=n_groups).clamp(min=1).to(device).unsqueeze(1).float()


def net_classes(net: torch.nn.Module) -> int:
    """Number of classes of a network's classifier (its last linear layer)."""
    return int(net.classifier.out_features)
