"""Class-balanced sampling without Python loops over classes or samples."""

from __future__ import annotations

import torch


class ClassIndex:
    """Indices of each class's samples in one padded (n_classes, max_count) table.

    Distillers draw a fresh class-balanced batch every iteration; with the table this is one `rand` + `topk`
    for all classes at once.
    """

    def __init__(self, labels: torch.Tensor, n_classes: int) -> None:
        labels = labels.detach().cpu().long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise ValueError(f"labels must lie in 0..{n_classes - 1}")
        self.n_classes = n_classes
        self.counts = torch.bincount(labels, minlength=n_classes)
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        starts = torch.cumsum(self.counts, 0) - self.counts
        position = torch.arange(labels.numel()) - starts[sorted_labels]
        width = max(1, int(self.counts.max())) if labels.numel() else 1
        self.table = torch.full((n_classes, width), -1, dtype=torch.long)
        self.table[sorted_labels, position] = order

    @property
    def present(self) -> torch.Tensor:
        """Class ids that have at least one sample."""
        return torch.nonzero(self.counts > 0).flatten()

    def sample(self, per_class: int, generator: torch.Generator | None = None,
               exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw up to `per_class` distinct samples of every present class.

        With `exact=True` every present class gets exactly `per_class` samples: a class with fewer samples
        repeats its own (in random order).  Returns (indices, classes): flat sample indices grouped by class,
        and the class of each.
        """
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        keys = torch.rand(self.table.shape, generator=generator)
        keys.masked_fill_(self.table < 0, 2.0)
        k = per_class if exact else min(per_class, self.table.shape[1])
        if exact:
            order = keys.argsort(dim=1)
            picks = order.gather(1, torch.arange(k).unsqueeze(0) % self.counts.clamp(min=1).unsqueeze(1))
            keep = (self.counts > 0).unsqueeze(1).expand(-1, k)
        else:
            picks = keys.topk(k, dim=1, largest=False).indices
            keep = torch.arange(k).unsqueeze(0) < self.counts.clamp(max=k).unsqueeze(1)
        chosen = self.table.gather(1, picks)
        classes = torch.arange(self.n_classes).unsqueeze(1).expand(-1, k)
        return chosen[keep], classes[keep]
