"""The server's pooled memory of clients' synthetic sets, and training a global model on it."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message

from fedcl.flower.protocol import EPSILON_SPENT, METRICS, SYNTHETIC_IMAGES, SYNTHETIC_KEY
from fedcl.flower.records import arrays_to_model, model_to_arrays, synset_from_record
from fedcl.models import create_model
from fedcl.screen import EmbeddingScreen
from fedcl.synthetic import SyntheticSet, SyntheticSetError
from fedcl.train import TrainConfig, train_model
from strategies.traffic import TrafficLog


def declares_nothing(reply: Message) -> bool:
    """True when a reply carries no synthetic set and its metrics say it distilled none (no local data)."""
    metrics = reply.content.metric_records.get(METRICS)
    return (SYNTHETIC_KEY not in reply.content.array_records and metrics is not None
            and int(metrics.get(SYNTHETIC_IMAGES, -1)) == 0)


class SyntheticMemory:
    """Validated synthetic sets by client node: every set ever received ("all") or each client's "latest".

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
        self.sets: dict[int, list[SyntheticSet]] = {}
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
        """Store a (validated) set from `node` under the memory policy."""
        kept = self.sets.get(node, []) if self.policy == "all" else []
        self.sets[node] = [*kept, synset]

    def __len__(self) -> int:
        return sum(len(s) for sets in self.sets.values() for s in sets)

    def save(self, directory: str | Path) -> dict[str, list[str]]:
        """Write every stored set into `directory` (once: files are named by node and content hash) and return the
        index that `restore` needs: {node: [file names, in arrival order]}."""
        directory, index = Path(directory), {}
        for node, sets in self.sets.items():
            index[str(node)] = []
            for synset in sets:
                name = f"{node}-{hashlib.sha256(synset.to_bytes()).hexdigest()[:16]}.safetensors"
                if not (directory / name).is_file():
                    synset.save(directory / name)
                index[str(node)].append(name)
        return index

    def restore(self, directory: str | Path, index: Mapping[str, list[str]]) -> None:
        """Replace the stored sets by those `save` wrote; each file is validated against this memory's limits.
        Raise ValueError (SyntheticSetError for a bad set file) naming the problem."""
        if not isinstance(index, Mapping):
            raise ValueError(f"memory index must map nodes to file lists, got {type(index).__name__}")
        sets: dict[int, list[SyntheticSet]] = {}
        for node, names in index.items():
            if not (isinstance(node, str) and node.isascii() and node.isdigit() and isinstance(names, list)):
                raise ValueError(f"memory index entry {node!r} is malformed")
            for name in names:
                if not isinstance(name, str) or not _SET_FILE.fullmatch(name) or not name.startswith(f"{node}-"):
                    raise ValueError(f"memory index names {name!r}, not a set file of node {node}")
                sets.setdefault(int(node), []).append(SyntheticSet.load(
                    Path(directory) / name, image_shape=self.image_shape, n_classes=self.n_classes,
                    max_images=self.max_images, max_bytes=self.max_bytes))
        self.sets = sets

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored images and hard labels, concatenated."""
        sets = [s.decode() for group in self.sets.values() for s in group]
        return torch.cat([s.images for s in sets]), torch.cat([s.hard_labels for s in sets])


#: Names of the set files `SyntheticMemory.save` writes: node id, dash, 16 hex digits of the content hash.
_SET_FILE = re.compile(r"[0-9]+-[0-9a-f]{16}\.safetensors")


def train_on_memory(arrays: ArrayRecord, memory: SyntheticMemory, *, model: str, model_cfg: dict,
                    config: TrainConfig, device: str, seed: int) -> ArrayRecord:
    """Continue training the model in `arrays` on the pooled memory; return the new weights."""
    net = create_model(model, memory.image_shape, memory.n_classes, **model_cfg)
    arrays_to_model(net, arrays)
    images, labels = memory.pooled()
    train_model(net, images, labels, config, device=device, seed=seed)
    return model_to_arrays(net)
