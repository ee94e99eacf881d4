"""The server's pool of clients' synthetic sets at the Flower-reply boundary, and training a global model on it.

The sets themselves live in a core `fedcl.memory.DistilledMemory` pool (`SyntheticMemory.store`), the one memory
type and file format of fedcl; this module only turns Flower replies into validated sets (decoding, pixel range,
screen, audit, reported privacy budget, failures in the traffic log) and applies the "all" / "latest" policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from fedcl.flower.protocol import EPSILON_SPENT, METRICS, SYNTHETIC_IMAGES, SYNTHETIC_KEY
from fedcl.flower.records import arrays_to_model, model_to_arrays, synset_from_record
from fedcl.memory import DistilledMemory
from fedcl.models import create_model
from fedcl.screen import EmbeddingScreen
from fedcl.synthetic import SyntheticSet, SyntheticSetError
from fedcl.train import TrainConfig, train_model
from strategies.boundary import finite
from strategies.traffic import TrafficLog


def declares_nothing(reply: Message) -> bool:
    """True when a reply carries no synthetic set and its metrics say it distilled none (no local data)."""
    metrics = reply.content.metric_records.get(METRICS)
    return (SYNTHETIC_KEY not in reply.content.array_records and metrics is not None
            and int(metrics.get(SYNTHETIC_IMAGES, -1)) == 0)


class SyntheticMemory:
    """Validated synthetic sets by client node: every set ever received ("all") or each client's "latest", held in
    `store`, an unbudgeted core `DistilledMemory` (`DistilledMemory.pool()`) that records each set's node.

    image_shape / n_classes: what every set must match.  max_images / max_bytes: per-set ceilings; a set above
    them is rejected as oversize.  pixel_range: (lowest, highest) pixel value a set may hold (None: any finite
    value).  screen: when given, the valid sets of a round are screened together
    (`fedcl.screen`) and the outliers are refused as failures with the screen's reason.  audit: when given, counts
    the near-copies of training images in a set (`fedcl.audit.Auditor.near_copies`); every valid upload is
    audited and `near_copies` holds the count by round.  `epsilon` holds, by node, the privacy budget each client
    reports it has spent (metric `epsilon-spent` of its distillation replies).
    """

    def __init__(self, *, image_shape: tuple[int, int, int], n_classes: int, max_images: int, max_bytes: int,
                 policy: str = "all", pixel_range: tuple[float, float] | None = None,
                 screen: EmbeddingScreen | None = None,
                 audit: Callable[[SyntheticSet], int] | None = None) -> None:
        if policy not in ("all", "latest"):
            raise ValueError(f"memory policy must be 'all' or 'latest', got {policy!r}")
        self.image_shape, self.n_classes, self.policy = tuple(image_shape), n_classes, policy
        self.max_images, self.max_bytes, self.screen = max_images, max_bytes, screen
        self.pixel_range, self.audit = pixel_range, audit
        self.store = DistilledMemory.pool()
        self.near_copies: dict[int, int] = {}
        self.epsilon: dict[int, float] = {}

    def accept(self, server_round: int, replies: Iterable[Message], traffic: TrafficLog) -> int:
        """Decode, screen and store the synthetic set of every successful reply; a malformed or screened-out set
        is a failure with its reason.  Returns how many sets were accepted."""
        replies = self.note_privacy(replies)
        return self.admit(server_round, self._decode(server_round, replies, traffic), traffic)

    def note_privacy(self, replies: Iterable[Message]) -> list[Message]:
        """Record the spent privacy budget that (boundary-checked) distillation replies report; returns them."""
        replies = list(replies)
        for reply in replies:
            metrics = reply.content.metric_records.get(METRICS) if not reply.has_error() else None
            if metrics is not None and EPSILON_SPENT in metrics:
                self.epsilon[int(reply.metadata.src_node_id)] = float(metrics[EPSILON_SPENT])
        return replies

    def admit(self, server_round: int, arrived: list[tuple[int, SyntheticSet]], traffic: TrafficLog) -> int:
        """Screen a round's valid (node, set) pairs together and store those that pass; the screened-out ones are
        failures with the screen's reason.  Every valid set is audited first (with `audit`).  Returns how many
        were stored."""
        if self.audit is not None and arrived:
            count = sum(self.audit(synset) for _, synset in arrived)
            self.near_copies[server_round] = self.near_copies.get(server_round, 0) + count
        if self.screen is not None and arrived:
            verdict = self.screen([synset for _, synset in arrived])
            for i in verdict.outliers:
                traffic.fail(server_round, arrived[i][0], verdict.reasons[i])
                traffic[server_round].screened += 1
            arrived = [arrived[i] for i in verdict.kept()]
        for node, synset in arrived:
            self.add(node, synset)
        return len(arrived)

    def _decode(self, server_round: int, replies: Iterable[Message],
                traffic: TrafficLog) -> list[tuple[int, SyntheticSet]]:
        """(node, set) of every reply that carries a valid set; the others are failures with the reason, except
        a reply that declares no synthetic images and carries none (a client with no data for the task)."""
        arrived = []
        for reply in replies:
            if reply.has_error() or declares_nothing(reply):
                continue  # an error is already counted by the metered grid
            node = int(reply.metadata.src_node_id)
            try:
                synset = synset_from_record(reply.content, image_shape=self.image_shape, n_classes=self.n_classes,
                                            max_images=self.max_images, max_bytes=self.max_bytes)
                self._check_pixels(synset)
            except SyntheticSetError as err:
                traffic.fail(server_round, node, f"rejected synthetic set: {err}")
            else:
                arrived.append((node, synset))
        return arrived

    def _check_pixels(self, synset: SyntheticSet) -> None:
        """Raise SyntheticSetError when a pixel lies outside `pixel_range` (a finite but huge image would wreck
        the training it enters and the screen's embeddings)."""
        if self.pixel_range is None or not len(synset):
            return
        low, high = self.pixel_range
        images = synset.float_images()  # the stored form's values: tiles only upsample them
        lowest, highest = float(images.min()), float(images.max())
        if lowest < low or highest > high:
            raise SyntheticSetError(f"pixels span [{lowest:.3g}, {highest:.3g}], outside the allowed "
                                    f"[{low:.3g}, {high:.3g}] (the dataset's normalised range plus a margin)")

    def add(self, node: int, synset: SyntheticSet) -> None:
        """Store a (validated) set from `node` under the memory policy: "latest" replaces the node's set in its
        place, "all" adds it after every set held."""
        held = self.store.keys_of(node) if self.policy == "latest" else []
        for key in held[1:]:
            del self.store.sets[key]
        self.store.put(held[0] if held else self.store.next_key(), synset, node=node)

    @property
    def sets(self) -> dict[int, list[SyntheticSet]]:
        """The stored sets by node (a view: change them through `add`)."""
        return self.store.by_node()

    def __len__(self) -> int:
        return len(self.store)

    @property
    def limits(self) -> dict[str, Any]:
        """What every set must match (`SyntheticSet.validate`'s limits), here and when restored from disk."""
        return {"image_shape": self.image_shape, "n_classes": self.n_classes, "max_images": self.max_images,
                "max_bytes": self.max_bytes}

    def save(self, directory: str | Path) -> Path:
        """Write the stored sets under `directory` in the core memory format (`DistilledMemory.save`)."""
        return self.store.save(directory)

    def load(self, directory: str | Path) -> None:
        """Replace the stored sets by those `save` wrote, each validated against this memory's `limits` and
        recording its node; SyntheticSetError names the problem."""
        self.store.load(directory, **self.limits)

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored images and hard labels, concatenated (node by node, each node's sets in arrival order)."""
        sets = [s.decode() for group in self.sets.values() for s in group]
        return torch.cat([s.images for s in sets]), torch.cat([s.hard_labels for s in sets])


def train_on_memory(arrays: ArrayRecord, memory: SyntheticMemory, *, model: str, model_cfg: dict,
                    config: TrainConfig, device: str, seed: int) -> ArrayRecord:
    """Continue training the model in `arrays` on the pooled memory; return the new weights, or `arrays`
    unchanged when training diverged to non-finite weights (sets with wild but finite pixels, when the memory
    checks no pixel range)."""
    net = create_model(model, memory.image_shape, memory.n_classes, **model_cfg)
    arrays_to_model(net, arrays)
    images, labels = memory.pooled()
    train_model(net, images, labels, config, device=device, seed=seed)
    trained = model_to_arrays(net)
    if not finite(trained):
        log(WARNING, "training on the pooled memory diverged to non-finite weights; the model is unchanged")
        return arrays
    return trained


#: Server-side training, injected into the strategies that train on their pooled memory: (the global model's
#: arrays, the memory, the server round) -> the new arrays.
ServerTraining = Callable[[ArrayRecord, SyntheticMemory, int], ArrayRecord]


@dataclass(frozen=True)
class MemoryTraining:
    """The strategies' default server-side training: `train_on_memory` with this model (a `fedcl.models` name and
    its options), training configuration and device, seeded by `seed` plus the round."""

    model: str
    config: TrainConfig
    model_cfg: dict = field(default_factory=dict)
    device: str = "auto"
    seed: int = 0

    def __call__(self, arrays: ArrayRecord, memory: SyntheticMemory, server_round: int) -> ArrayRecord:
        return train_on_memory(arrays, memory, model=self.model, model_cfg=self.model_cfg, config=self.config,
                               device=self.device, seed=self.seed + server_round)
