"""Memorisation audit: does a synthetic set contain near-copies of real training images?

For every synthetic image, the distance to its nearest real training image is compared with how close real images
typically are to each other: the median, over a seeded sample of real training images, of the distance from each to
its nearest *other* training image.  Both are measured in two spaces,
  - pixels (the dataset's normalised pixel space), and
  - features of a fixed, randomly initialised ConvNet (seeded; random networks are what DM matches embeddings in),
and expressed as ratios  r = d(synthetic, nearest real) / median d(real, nearest other real).
A synthetic image is flagged as a near-copy when r < threshold in either space (default 0.5: at most half the
typical gap between two distinct real images).  Exact copies have r = 0; DM images, which match class statistics
rather than single images, sit near or above 1.

Distances are computed with `torch.cdist` over chunks of the reference set, keeping a running minimum, so memory
stays bounded by (queries x chunk) whatever the dataset size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcl.data.datasets import ImageDataset
from fedcl.models import create_model
from fedcl.runtime import generator, resolve_device, seeded
from fedcl.synthetic import SyntheticMeta, SyntheticSet

#: Default near-copy threshold on the distance ratio (see the module docstring).
DEFAULT_THRESHOLD = 0.5


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, *, chunk: int = 4096,
                       exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query row to its nearest reference row, and that row's index.

    `exclude[i]` (optional) is a reference index query i may not match (itself, for real-to-real distances).
    References are processed `chunk` rows at a time.
    """
    best = torch.full((len(queries),), math.inf, device=queries.device)
    arg = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    for start in range(0, len(references), chunk):
        dist = torch.cdist(queries, references[start:start + chunk])
        if exclude is not None:
            local = exclude.to(queries.device) - start
            inside = (local >= 0) & (local < dist.shape[1])
            dist[inside.nonzero().flatten(), local[inside]] = math.inf
        value, index = dist.min(dim=1)
        better = value < best
        best = torch.where(better, value, best)
        arg = torch.where(better, index + start, arg)
    return best, arg


@torch.no_grad()
def embed(net: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    """The network's embedding of `images`, computed in batches on `device`."""
    return torch.cat([net.embed(images[i:i + batch].to(device)).float() for i in range(0, len(images), batch)])


@dataclass
class AuditReport:
    """Nearest-real-neighbour distances of every synthetic image, against the real-to-real baseline."""

    labels: torch.Tensor
    nearest_index: torch.Tensor
    nearest_label: torch.Tensor
    pixel_distance: torch.Tensor
    feature_distance: torch.Tensor
    pixel_baseline: float
    feature_baseline: float
    threshold: float
    real_sample: int

    @property
    def pixel_ratio(self) -> torch.Tensor:
        return self.pixel_distance / self.pixel_baseline

    @property
    def feature_ratio(self) -> torch.Tensor:
        return self.feature_distance / self.feature_baseline

    @property
    def flagged(self) -> torch.Tensor:
        """Near-copies: ratio below the threshold in pixels or in features."""
        return (self.pixel_ratio < self.threshold) | (self.feature_ratio < self.threshold)

    def summary(self) -> list[dict[str, Any]]:
        """One row per class and one for the whole set: count, min / median ratios, number flagged."""
        rows = []
        for name, mask in [*((str(int(c)), self.labels == c) for c in self.labels.unique()),
                           ("all", torch.ones_like(self.labels, dtype=torch.bool))]:
            px, ft = self.pixel_ratio[mask], self.feature_ratio[mask]
            rows.append({"class": name, "images": int(mask.sum()), "pixel_min": float(px.min()),
                         "pixel_median": float(px.median()), "feature_min": float(ft.min()),
                         "feature_median": float(ft.median()), "flagged": int(self.flagged[mask].sum())})
        return rows

    def table(self) -> str:
        """The summary as an aligned text table with the baseline it is relative to."""
        lines = [f"nearest real neighbour / median real-to-real nearest-neighbour distance "
                 f"(baseline over {self.real_sample} real images: pixels {self.pixel_baseline:.4g}, "
                 f"features {self.feature_baseline:.4g}); flagged: ratio < {self.threshold:g} in either space",
                 f"{'class':>6} {'images':>6} {'pixel min':>10} {'pixel med':>10} {'feat min':>10} {'feat med':>10} "
                 f"{'flagged':>8}"]
        for r in self.summary():
            lines.append(f"{r['class']:>6} {r['images']:>6} {r['pixel_min']:>10.3f} {r['pixel_median']:>10.3f} "
                         f"{r['feature_min']:>10.3f} {r['feature_median']:>10.3f} {r['flagged']:>8}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything, per image and summarised, for audit.json."""
        images = [{"index": i, "label": int(self.labels[i]), "nearest_real_index": int(self.nearest_index[i]),
                   "nearest_real_label": int(self.nearest_label[i]),
                   "pixel_distance": float(self.pixel_distance[i]), "pixel_ratio": float(self.pixel_ratio[i]),
                   "feature_distance": float(self.feature_distance[i]),
                   "feature_ratio": float(self.feature_ratio[i]), "flagged": bool(self.flagged[i])}
                  for i in range(len(self.labels))]
        return {"threshold": self.threshold, "rule": "flagged when pixel_ratio or feature_ratio < threshold",
                "baseline": {"pixel_median": self.pixel_baseline, "feature_median": self.feature_baseline,
                             "real_sample": self.real_sample},
                "n_images": len(self.labels), "n_flagged": int(self.flagged.sum()), "summary": self.summary(),
                "images": images}


def normalised_images(synset: SyntheticSet, dataset: ImageDataset) -> torch.Tensor:
    """The set's decoded training images in the dataset's normalised pixel space (undo the set's own
    normalisation first)."""
    pixels = synset.decode().images.detach().cpu().float() * torch.tensor(synset.meta.std).view(1, -1, 1, 1) \
        + torch.tensor(synset.meta.mean).view(1, -1, 1, 1)
    return (pixels - torch.tensor(dataset.mean).view(1, -1, 1, 1)) / torch.tensor(dataset.std).view(1, -1, 1, 1)


class Auditor:
    """The audit against one dataset's training split, prepared once: the real images in both spaces and their
    real-to-real baselines, so that many sets (every upload of a federation) are audited at the cost of their own
    images only.  Options as in `audit_synthetic`."""

    def __init__(self, dataset: ImageDataset, *, threshold: float = DEFAULT_THRESHOLD, real_sample: int = 500,
                 feature_width: int = 64, seed: int = 0, device: str | torch.device = "auto",
                 chunk: int = 4096) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if real_sample < 1:
            raise ValueError(f"real_sample must be >= 1, got {real_sample}")
        self.dataset, self.threshold, self.chunk = dataset, threshold, chunk
        self.device = resolve_device(device)
        real = dataset.train_images
        picks = torch.randperm(len(real), generator=generator(seed))[:real_sample]
        self.real_sample = len(picks)
        with seeded(seed):
            self.net = create_model("convnet", dataset.image_shape, dataset.n_classes,
                                    width=feature_width).to(self.device).eval()
        self.real = {"pixel": real.flatten(1).to(self.device), "feature": embed(self.net, real, self.device)}
        self.baseline = {}
        for name, real_x in self.real.items():
            distance, _ = nearest_neighbours(real_x[picks.to(self.device)], real_x, chunk=chunk, exclude=picks)
            self.baseline[name] = float(distance.median())
        if min(self.baseline.values()) <= 0:
            raise ValueError("the real-to-real baseline distance is 0 (duplicated training images): "
                             "increase real_sample")

    def __call__(self, synset: SyntheticSet) -> AuditReport:
        """The audit of one set (ValueError when it comes from another dataset or does not fit it)."""
        if synset.meta.dataset not in ("unknown", self.dataset.name):
            raise ValueError(f"the set was distilled from {synset.meta.dataset!r}, not {self.dataset.name!r}: "
                             f"audit it with --dataset {synset.meta.dataset}")
        return self._report(synset)

    def near_copies(self, synset: SyntheticSet) -> int:
        """How many of the set's (decoded) images are near-copies of a training image.  The set's own claim of
        its dataset is not trusted: a server audits every upload against the data it expects."""
        return int(self._report(synset).flagged.sum())

    def _report(self, synset: SyntheticSet) -> AuditReport:
        dataset = self.dataset
        synset = synset.validate(image_shape=dataset.image_shape, n_classes=dataset.n_classes).decode()
        syn = normalised_images(synset, dataset)
        queries = {"pixel": syn.flatten(1).to(self.device), "feature": embed(self.net, syn, self.device)}
        found = {name: nearest_neighbours(queries[name], self.real[name], chunk=self.chunk) for name in queries}
        nearest = found["pixel"][1].cpu()
        return AuditReport(synset.hard_labels.cpu(), nearest, dataset.train_labels[nearest],
                           found["pixel"][0].cpu(), found["feature"][0].cpu(), self.baseline["pixel"],
                           self.baseline["feature"], self.threshold, self.real_sample)


def audit_synthetic(synset: SyntheticSet, dataset: ImageDataset, *, threshold: float = DEFAULT_THRESHOLD,
                    real_sample: int = 500, feature_width: int = 64, seed: int = 0,
                    device: str | torch.device = "auto", chunk: int = 4096) -> AuditReport:
    """Audit `synset` against `dataset`'s training split (see the module docstring for the method and the rule).

    real_sample: real images whose nearest other real image sets the baseline.  feature_width: width of the fixed
    random ConvNet-3 (seeded by `seed`) whose embeddings give the feature distances.
    """
    return Auditor(dataset, threshold=threshold, real_sample=real_sample, feature_width=feature_width, seed=seed,
                   device=device, chunk=chunk)(synset)


def closest_pairs_png(report: AuditReport, synset: SyntheticSet, dataset: ImageDataset,
                      path: str | os.PathLike[str], *, pairs: int = 8) -> Path:
    """A PNG of the `pairs` synthetic images closest to real ones (by the smaller ratio), each beside its nearest
    real image: one pair per row, labelled with the class, the train-set index and both ratios."""
    from matplotlib.figure import Figure

    from fedcl.files import save_figure

    order = torch.minimum(report.pixel_ratio, report.feature_ratio).argsort()[:pairs]
    meta = SyntheticMeta(method="audit-pairs", n_classes=dataset.n_classes, ipc=1, dataset=dataset.name,
                         mean=tuple(dataset.mean), std=tuple(dataset.std))
    syn = SyntheticSet(normalised_images(synset, dataset)[order], report.labels[order], meta).pixels()
    real = SyntheticSet(dataset.train_images[report.nearest_index[order]], report.nearest_label[order], meta).pixels()
    fig = Figure(figsize=(4.6, 1.5 * len(order) + 0.9))
    axes = fig.subplots(len(order), 2, squeeze=False)
    for row, i in enumerate(order.tolist()):
        for col, image in enumerate((syn[row], real[row])):
            ax = axes[row][col]
            shown = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
            ax.imshow(shown.numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        flag = "  near-copy" if bool(report.flagged[i]) else ""
        axes[row][0].set_ylabel(f"class {int(report.labels[i])}", fontsize=8)
        axes[row][1].set_ylabel(f"train #{int(report.nearest_index[i])}", fontsize=8)
        axes[row][1].yaxis.set_label_position("right")
        axes[row][0].set_title(f"pixel {float(report.pixel_ratio[i]):.2f}, feature {float(report.feature_ratio[i]):.2f}"
                               f"{flag}", fontsize=7, loc="left")
    axes[0][0].set_title(f"synthetic\n{axes[0][0].get_title(loc='left')}", fontsize=8, loc="left")
    axes[0][1].set_title("nearest real training image", fontsize=8)
    fig.suptitle(f"{dataset.name}: the {len(order)} synthetic images closest to a real one\n"
                 f"(distance / median real-to-real gap; near-copy below {report.threshold:g})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
