"""Coreset baselines: real images chosen per class, at random or by herding.

They answer the question every distilled set must: is it better than keeping the same number of real images?
"""

from __future__ import annotations

import torch

from fedcl.data.sampling import ClassIndex
from fedcl.distill.base import Distiller, DistillResult, ProgressCallback, register
from fedcl.runtime import generator as make_generator
from fedcl.train import TrainConfig, train_model


@register
class RandomCoreset(Distiller):
    """`ipc` real images per class drawn uniformly at random (fewer-than-ipc classes repeat their images)."""

    name = "random"

    def _distill(self, images, labels, ipc, n_classes, callback: ProgressCallback | None) -> DistillResult:
        picks, classes = ClassIndex(labels, n_classes).sample(ipc, make_generator(self.seed), exact=True)
        return DistillResult(images[picks].clone(), classes)


@register
class HerdingCoreset(Distiller):
    """Herding selection (Welling 2009): per class, greedily add the image that keeps the running mean of the
    chosen embeddings closest to the class mean embedding.

    features: "model" (embeddings of the configured network, trained for `pretrain_epochs` epochs on the data
    first; 0 keeps its random initialisation) or "pixels".
    """

    name = "herding"

    def __init__(self, *, features: str = "model", pretrain_epochs: int = 0, **base) -> None:
        super().__init__(**base)
        if features not in ("model", "pixels"):
            raise ValueError(f"features must be 'model' or 'pixels', got {features!r}")
        self.features, self.pretrain_epochs = features, pretrain_epochs

    @torch.no_grad()
    def _embed(self, images: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
        if self.features == "pixels":
            return images.flatten(1)
        net = self.new_model(tuple(images.shape[1:]), n_classes, self.seed)
        if self.pretrain_epochs:
            with torch.enable_grad():
                train_model(net, images, labels, TrainConfig(epochs=self.pretrain_epochs, dsa=False),
                            device=self.device, seed=self.seed)
        net.eval()
        return torch.cat([net.embed(images[i:i + 512].to(self.device)).cpu() for i in range(0, len(images), 512)])

    def _distill(self, images, labels, ipc, n_classes, callback: ProgressCallback | None) -> DistillResult:
        features = self._embed(images, labels, n_classes)
        picks = torch.cat([self.herd(features, torch.nonzero(labels == c).flatten(), ipc)
                           for c in torch.unique(labels).tolist()])
        return DistillResult(images[picks].clone(), labels[picks].clone(), extra={"features": self.features})

    @staticmethod
    def herd(features: torch.Tensor, members: torch.Tensor, ipc: int) -> torch.Tensor:
        """Indices (into `features`) of `ipc` herded members; all of them, repeated, if the class is smaller."""
        if len(members) <= ipc:
            return members[torch.arange(ipc) % len(members)]
        feats = features[members].double()
        target = feats.mean(dim=0)
        chosen = torch.zeros(len(members), dtype=torch.bool)
        total = torch.zeros_like(target)
        order = []
        for step in range(ipc):
            distance = ((target - (total + feats) / (step + 1)) ** 2).sum(dim=1)
            distance[chosen] = float("inf")
            best = int(distance.argmin())
            chosen[best] = True
            total += feats[best]
            order.append(best)
        return members[torch.tensor(order)]
