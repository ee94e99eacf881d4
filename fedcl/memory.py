"""DistilledMemory: a replay memory of distilled data under a fixed budget - the one implementation of its logic.

One SyntheticSet per key.  Two ways to fill it:
- `add(key, ...)` distils a whole group (a federated client's task) into the set held under `key`;
- `absorb(...)` keys the memory by class (key `class_key(task, class)`, one set per task label and class), for
  streams whose classes reappear (Avalanche experiences, online streams of small experiences): a new class is
  distilled from its samples, a class already held is updated, warm-started from its own images, in a few
  iterations (see `absorb`), so the cost of an experience does not grow with the length of the stream.

Three budgets:
- `max_size` (total images): ipc = max_size // (classes held, counted once per key), so ipc shrinks as classes
  arrive and the sets already held are compressed to the new ipc - re-distilled from their own synthetic images
  (default), herded or truncated within them.  While the budget holds one image per class every class seen stays
  represented.  Past that (more classes than `max_size`) the memory keeps one image for each of the `max_size`
  most recently updated classes and drops the others (`fit_budget`; ties go by key, then class id, smaller
  first), so the memory never exceeds its budget and never stops a run;
- `images_per_class`: a fixed ipc; the memory grows by that many images per new class;
- `mem_bytes` (total bytes of the stored sets, `SyntheticSet.nbytes`): as `max_size`, with the number of images
  the bytes allow in the distiller's stored form (`storage`), so a uint8 memory holds about four times the images
  of a float32 one in the same bytes (`stored_cost`).  `fit_budget` drops classes while the held sets' bytes exceed
  the budget, so soft-labelled sets, whose label rows cost more than the int64 class ids counted, stay within it too.

A held set may carry soft labels (a distribution per image, e.g. a model's predictions recorded by `relabel`);
`labelled` hands them to replay, and compression keeps each kept image's own label (`carry_soft_labels`).

A pool (`DistilledMemory.pool()`) has no budget: `put(key, synset, node=...)` stores a set validated elsewhere
as it is (a federated server's pool of its clients' uploads, `strategies.memory.SyntheticMemory`), recording the
node it came from, so the sets can be read by node (`by_node`).

The memory is persisted as SyntheticSet safetensors blobs plus a JSON index (`dump` / `restore`), on disk
(`save` / `load`, atomic writes) or in any key-value store such as a Flower client's `Context.state`; nothing is
ever unpickled and every set is validated on the way back (against the receiver's limits, when given).  It is the
one memory type and the one memory file format of fedcl: `fedcl.avalanche.DistilledBuffer` wraps this class for
Avalanche, the federated continual client (`fedcl.flower.continual_client`) uses it directly, and the federated
server keeps its pool in one and checkpoints it with `save` / `load` (`fedcl.flower.checkpoint`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedcl.distill.base import Distiller, Source, create_distiller
from fedcl.files import atomic_write
from fedcl.synthetic import MAX_CLASSES, SyntheticMeta, SyntheticSet, SyntheticSetError
from fedcl.train import common_labels

COMPRESSIONS = ("redistill", "herding", "truncate")
INDEX_FILE = "memory.json"
#: At most this many real samples are stood for by a held class's images when the class is updated (`absorb`):
#: the weight of the past is absorbed / (absorbed + new) up to this cap, an exponential moving average after it.
HISTORY = 512
#: What a set's metadata records about its place in memory; kept when the set is compressed or updated.
#: `node`: the federated client a pooled set came from (`put`).
BOOKKEEPING = ("task_label", "step", "absorbed", "node")


class DistilledMemory:
    """Distilled sets by key under a budget of `max_size` images in all, `images_per_class` images per class or
    `mem_bytes` bytes of stored sets in all.

    compress: how held sets shrink when new classes arrive under `max_size`: "redistill" (the distiller passed to
        `add`/`resize`, from the stored synthetic images), "herding" (herding within them, pixel features) or
        "truncate" (the first images of each class).
    seed: seed of the herding compression.
    unbudgeted: no budget at all (give none): a pool of sets stored as they are with `put`; `pool()` makes one.
    """

    def __init__(self, max_size: int | None = None, *, images_per_class: int | None = None,
                 mem_bytes: int | None = None, compress: str = "redistill", seed: int = 0,
                 unbudgeted: bool = False) -> None:
        budgets = {"max_size": max_size, "images_per_class": images_per_class, "mem_bytes": mem_bytes}
        if sum(v is not None for v in budgets.values()) != (0 if unbudgeted else 1):
            raise ValueError("give exactly one memory budget: max_size (total images), images_per_class or "
                             f"mem_bytes (total bytes), or none for an unbudgeted pool; got {budgets}")
        if any(v is not None and v < 1 for v in budgets.values()):
            raise ValueError(f"memory budget must be >= 1, got {budgets}")
        if compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {COMPRESSIONS}, got {compress!r}")
        self.max_size, self.images_per_class, self.mem_bytes = max_size, images_per_class, mem_bytes
        self.unbudgeted = bool(unbudgeted)
        #: (bytes per stored image, bytes per set) of the stored form under `mem_bytes`, from `stored_cost`.
        self.cost: tuple[int, int] | None = None
        self.compress, self.seed = compress, int(seed)
        self.sets: dict[int, SyntheticSet] = {}
        #: One record per `add` / `absorb`: the key or step, the ipc, the memory size after it, seconds distilling
        #: and compressing.
        self.history: list[dict[str, Any]] = []
        #: Counts `add` / `absorb` calls; every set records the step that last updated it (the eviction order).
        self.step = 0

    @classmethod
    def pool(cls) -> DistilledMemory:
        """An unbudgeted memory: sets validated elsewhere are stored as they are (`put`), never distilled, compressed
        or dropped by the memory itself."""
        return cls(unbudgeted=True)

    # ------------------------------------------------------------------ what is held
    def __len__(self) -> int:
        return sum(len(s) for s in self.sets.values())

    @property
    def n_groups(self) -> int:
        """Classes held, counted once per key (permuted streams repeat classes across keys)."""
        return sum(len(s.classes()) for s in self.sets.values())

    def seen_classes(self) -> list[int]:
        return sorted({c for s in self.sets.values() for c in s.classes()})

    @property
    def nbytes(self) -> int:
        """Bytes of the held sets in their stored form."""
        return sum(s.nbytes for s in self.sets.values())

    def by_node(self) -> dict[int, list[SyntheticSet]]:
        """The held sets by the node recorded by `put`: nodes in the order of their first held set, each node's
        sets in key order.  SyntheticSetError when a set records no valid node."""
        nodes: dict[int, list[SyntheticSet]] = {}
        for key in sorted(self.sets):
            nodes.setdefault(node_of(self.sets[key]), []).append(self.sets[key])
        return nodes

    def keys_of(self, node: int) -> list[int]:
        """The keys of the sets `put` stored from `node`, in order."""
        return [key for key in sorted(self.sets) if self.sets[key].meta.extra.get("node") == int(node)]

    def next_key(self) -> int:
        """A key above every held one."""
        return max(self.sets, default=-1) + 1

    def ipc_for(self, n_groups: int) -> int:
        """Images per class for `n_groups` classes under the budget: the images it allows // n_groups, at least 1.
        With more classes than the budget holds, `fit_budget` then drops the least recently updated ones."""
        self._budgeted("distil into it")
        if self.images_per_class is not None:
            return self.images_per_class
        return max(1, self.total_images(n_groups) // max(1, n_groups))

    def total_images(self, n_groups: int) -> int:
        """The most images a total budget allows for `n_groups` classes (one set each): `max_size`, or what
        `mem_bytes` pays for in the stored form measured by `measure`."""
        if self.mem_bytes is None:
            return int(self.max_size)
        if self.cost is None:
            raise ValueError("a mem_bytes budget counts images once their stored form is known: call measure first")
        per_image, per_set = self.cost
        return max(0, self.mem_bytes - max(1, n_groups) * per_set) // per_image

    def capacity(self) -> int:
        """The most images the budget allows for the classes held now (a pool: the images it holds)."""
        if self.unbudgeted:
            return len(self)
        if self.images_per_class is not None:
            return self.images_per_class * self.n_groups
        return self.total_images(self.n_groups)

    def measure(self, images: torch.Tensor, distiller: Distiller) -> None:
        """Under `mem_bytes`, record the cost of `distiller`'s stored form for images like `images` (once)."""
        if self.mem_bytes is not None and self.cost is None:
            self.cost = stored_cost(images, str(getattr(distiller, "storage", "float32")))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, hard labels, task labels) of every held set, in key order (empty tensors when nothing is held)."""
        if not self.sets:
            return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        ordered = [self.sets[k].decode() for k in sorted(self.sets)]  # training images of any stored form
        tasks = [torch.full((len(s),), task_label(s), dtype=torch.long) for s in ordered]
        return (torch.cat([s.images for s in ordered]), torch.cat([s.hard_labels for s in ordered]),
                torch.cat(tasks))

    def soft_targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images, target distributions) of the soft-labelled sets held, or None when all labels are hard."""
        soft = [s.decode() for s in self.sets.values() if s.soft_labels]
        if not soft:
            return None
        return torch.cat([s.images for s in soft]), torch.cat([as_distribution(s.labels) for s in soft])

    def labelled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of every held set, in key order, for replay: class ids when every set has hard labels,
        else a distribution per image (soft labels as held, hard ones as one-hot rows)."""
        if not self.sets:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        ordered = [self.sets[k].decode() for k in sorted(self.sets)]
        labels = common_labels(*(as_distribution(s.labels) if s.soft_labels else s.labels for s in ordered))
        return torch.cat([s.images for s in ordered]), torch.cat(labels)

    # ------------------------------------------------------------------ changing it
    def _budgeted(self, doing: str) -> None:
        if self.unbudgeted:
            raise ValueError(f"an unbudgeted pool stores sets as they are (put); it cannot {doing}")

    def put(self, key: int, synset: SyntheticSet, *, node: int, task: int = 0) -> SyntheticSet:
        """Store `synset` (validated by the caller, e.g. against a server's limits) under `key` as it is, replacing
        any set held there; its metadata records the `node` it came from, the `task` and this step (any such
        bookkeeping the set arrived with is replaced).  Under a budget, `fit_budget` follows.  Returns the stored
        set."""
        if isinstance(node, bool) or int(node) < 0:
            raise ValueError(f"node must be a non-negative integer, got {node!r}")
        foreign = {k: v for k, v in synset.meta.extra.items() if k not in BOOKKEEPING}
        self.step += 1
        stored = recorded(replace(synset, meta=replace(synset.meta, extra=foreign)), task=task, step=self.step,
                          node=node)
        self.sets[int(key)] = stored
        self.fit_budget()
        return self.sets.get(int(key), stored)

    def add(self, key: int, images: torch.Tensor, labels: torch.Tensor, distiller: Distiller, *, n_classes: int,
            source: Source | None = None, task: int = 0) -> SyntheticSet:
        """Distil (images, labels) into the set held under `key` (replacing any earlier one), first compressing
        the other sets to make room; return the new set."""
        self._budgeted("distil into it")
        new_groups = len(torch.unique(labels))
        self.measure(images, distiller)
        previous = self.sets.pop(int(key), None)
        ipc = self.ipc_for(self.n_groups + new_groups)
        start = time.perf_counter()
        try:
            self.shrink_to(ipc, distiller)
        except BaseException:
            if previous is not None:
                self.sets[int(key)] = previous
            raise
        compress_seconds = time.perf_counter() - start
        start = time.perf_counter()
        synset = distiller.distill(images, labels, ipc=ipc, n_classes=n_classes, source=source or Source())
        self.step += 1
        self.sets[int(key)] = recorded(synset, task=task, step=self.step, absorbed=len(labels))
        self.fit_budget()
        self.history.append({"key": int(key), "ipc": ipc, "n_images": len(self),
                             "distill_seconds": round(time.perf_counter() - start, 3),
                             "compress_seconds": round(compress_seconds, 3)})
        return self.sets.get(int(key), synset)

    def absorb(self, images: torch.Tensor, labels: torch.Tensor, distiller: Distiller, *, n_classes: int,
               tasks: torch.Tensor | int = 0, source: Source | None = None,
               update_iterations: int | None = None) -> dict[str, Any]:
        """Take (images, labels) into the class-keyed memory, one set per (task label, class); return the
        history record.

        The held sets are first compressed to the ipc of all classes after this step.  A class not held yet is
        distilled from its samples (with the distiller as configured).  A class already held is updated: its
        new samples are pooled with its held images, repeated to stand for the real samples it absorbed before
        (at most HISTORY), and distilled from that pool by the distiller running `update_iterations` iterations
        (default a tenth of its own, at least 1), starting from the held images for DM-family distillers (the
        `initial_images` hook; a held set below the ipc is topped up with new samples), from samples of the
        pool for the others.  Last, `fit_budget`.  tasks: one task label per sample, or one for all."""
        tasks = torch.as_tensor(tasks, dtype=torch.long).expand(labels.shape)
        pairs = sorted(set(zip(tasks.tolist(), labels.tolist())))
        new = sum(class_key(t, c) not in self.sets for t, c in pairs)
        self.measure(images, distiller)
        ipc = self.ipc_for(self.n_groups + new)
        start = time.perf_counter()
        self.shrink_to(ipc, distiller)
        compress_seconds, start = time.perf_counter() - start, time.perf_counter()
        self.step += 1
        options = {"ipc": ipc, "n_classes": n_classes, "source": source or Source()}
        for task in sorted(set(tasks.tolist())):
            x, y = images[tasks == task], labels[tasks == task]
            held = [c for c in torch.unique(y).tolist() if class_key(task, c) in self.sets]
            fresh = ~torch.isin(y, torch.tensor(held, dtype=torch.long))
            if bool(fresh.any()):
                self._store(distiller.distill(x[fresh], y[fresh], **options), task, y[fresh])
            if held:
                self._update(x[~fresh], y[~fresh], task, held, distiller, update_iterations, options)
        self.fit_budget()
        record = {"step": self.step, "ipc": ipc, "n_images": len(self), "new_classes": new,
                  "updated_classes": len(pairs) - new, "distill_seconds": round(time.perf_counter() - start, 3),
                  "compress_seconds": round(compress_seconds, 3)}
        self.history.append(record)
        return record

    def _update(self, images: torch.Tensor, labels: torch.Tensor, task: int, classes: list[int],
                distiller: Distiller, iterations: int | None, options: dict[str, Any]) -> None:
        """Re-distil the held sets of `classes` (of `task`) from their new samples and their own images."""
        held = {c: self.sets[class_key(task, c)] for c in classes}
        stored = {c: held[c].float_images() for c in classes}  # uint8 codes dequantised
        start = [topped_up(stored[c], images[labels == c], options["ipc"]) for c in classes]
        stand_in = [stored[c].repeat(-(-min(absorbed(held[c]), HISTORY) // len(held[c])), 1, 1, 1)
                    for c in classes]
        pool_x = torch.cat([images, *stand_in])
        pool_y = torch.cat([labels, *(torch.full((len(s),), c, dtype=torch.long) for s, c in zip(stand_in, classes))])
        init_y = torch.cat([torch.full((len(s),), c, dtype=torch.long) for s, c in zip(start, classes)])
        if iterations is None:
            iterations = max(1, int(getattr(distiller, "iterations", 10)) // 10)
        synset = warm_started(distiller, torch.cat(start), init_y, iterations).distill(pool_x, pool_y, **options)
        previous = {c: absorbed(held[c]) for c in classes}
        self._store(synset, task, labels, previous)

    def _store(self, synset: SyntheticSet, task: int, labels: torch.Tensor,
               previous: dict[int, int] | None = None) -> None:
        """Hold each class of `synset` as its own set, recording the samples it has absorbed so far."""
        for c in synset.classes():
            count = int((labels == c).sum()) + (previous or {}).get(c, 0)
            self.sets[class_key(task, c)] = recorded(only_classes(synset, [c]), task=task, step=self.step,
                                                    absorbed=count)

    def fit_budget(self) -> list[tuple[int, int]]:
        """Under `max_size` or `mem_bytes`, drop whole classes - least recently updated first, ties by key then
        class id - until the memory holds at most max_size images or mem_bytes bytes; return the (key, class) pairs
        dropped."""
        if self.images_per_class is not None or self.unbudgeted:
            return []
        order = sorted((recency(s), key, c) for key, s in self.sets.items() for c in s.classes())
        dropped = []
        while (len(self) > self.max_size) if self.mem_bytes is None else (self.nbytes > self.mem_bytes):
            _, key, c = order.pop(0)
            rest = [k for k in self.sets[key].classes() if k != c]
            if rest:
                self.sets[key] = only_classes(self.sets[key], rest)
            else:
                del self.sets[key]
            dropped.append((key, c))
        return dropped

    def relabel(self, key: int, labels: torch.Tensor) -> SyntheticSet:
        """Give the set held under `key` new labels, e.g. soft labels recorded from a model (validated; every
        image keeps its class: the arg-max of its new label must be its old class id); return the new set."""
        synset = self.sets[int(key)]
        if labels.shape[:1] != synset.labels.shape[:1]:
            raise ValueError(f"need one label per image ({len(synset)}), got shape {tuple(labels.shape)}")
        relabelled = replace(synset, labels=labels.detach().cpu().contiguous()).validate()
        if not torch.equal(relabelled.hard_labels, synset.hard_labels):
            raise ValueError("relabelling must keep every image's class (the arg-max of its label)")
        self.sets[int(key)] = relabelled
        return relabelled

    def resize(self, new_size: int, distiller: Distiller | None = None) -> None:
        """Change to a total budget of `new_size` images (whatever the budget was); held sets are compressed to fit,
        and below one image per class the least recently updated classes are dropped."""
        if new_size < 1:
            raise ValueError(f"memory budget must be >= 1, got {new_size}")
        self._budgeted("be resized")
        self.max_size, self.images_per_class, self.mem_bytes = new_size, None, None
        if self.sets:
            self.shrink_to(self.ipc_for(self.n_groups), distiller)
            self.fit_budget()

    def shrink_to(self, ipc: int, distiller: Distiller | None = None) -> None:
        """Compress every held set with more than `ipc` images per class down to `ipc`."""
        for key, synset in self.sets.items():
            if synset.meta.ipc > ipc:
                self.sets[key] = carry_record(synset, self._compressed(synset, ipc, distiller))

    def _compressed(self, synset: SyntheticSet, ipc: int, distiller: Distiller | None) -> SyntheticSet:
        """The set compressed to `ipc` images per class; soft labels survive (see `carry_soft_labels`)."""
        compressed = self._compressed_images(synset, ipc, distiller)
        return carry_soft_labels(synset, compressed) if synset.soft_labels else compressed

    def _compressed_images(self, synset: SyntheticSet, ipc: int, distiller: Distiller | None) -> SyntheticSet:
        if self.compress == "truncate":
            return truncate(synset, ipc)
        if self.compress == "herding":
            distiller = create_distiller("herding", features="pixels", seed=self.seed, storage=synset.meta.storage)
        if distiller is None:
            raise ValueError("compress='redistill' needs the distiller to shrink the held sets")
        source = Source(synset.meta.dataset, synset.meta.mean, synset.meta.std)
        decoded = synset.decode()
        return distiller.distill(decoded.images, decoded.hard_labels, ipc=ipc, n_classes=synset.meta.n_classes,
                                 source=source)

    # ------------------------------------------------------------------ persistence
    def dump(self, **extra: Any) -> dict[str, bytes]:
        """The memory as named blobs: INDEX_FILE (JSON: budget, files by key, `extra`) and one safetensors blob per
        set.  `restore` reads them back; `save` writes them as files."""
        files = {str(key): f"set-{key:03d}.safetensors" for key in sorted(self.sets)}
        index = {"max_size": self.max_size, "images_per_class": self.images_per_class, "mem_bytes": self.mem_bytes,
                 "files": files, **extra}
        blobs = {name: self.sets[int(key)].to_bytes() for key, name in files.items()}
        return {INDEX_FILE: json.dumps(index).encode(), **blobs}

    def restore(self, blobs: dict[str, bytes], **limits: Any) -> dict[str, Any]:
        """Replace the held sets with those in `blobs` (made by `dump`; validated, never unpickled, and checked
        against `limits` - `SyntheticSet.validate`'s image_shape, n_classes, max_images, max_bytes - when given);
        return the index (with any `extra` keys given to `dump`).  The budget stays this memory's own; a pool needs
        every set to record its node."""
        try:
            index = json.loads(blobs[INDEX_FILE])
            files = {int(k): str(v) for k, v in index["files"].items()}
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise SyntheticSetError(f"memory index {INDEX_FILE} is missing or malformed: {err!r}") from None
        sets = {}
        for key, name in files.items():
            if Path(name).name != name or name == INDEX_FILE:
                raise SyntheticSetError(f"memory index names a file outside the memory: {name!r}")
            if name not in blobs:
                raise SyntheticSetError(f"memory index names {name!r}, which is missing")
            try:
                sets[key] = SyntheticSet.from_bytes(blobs[name], **limits)
                task_label(sets[key])  # fail early on a set without a usable task label
                if self.unbudgeted or "node" in sets[key].meta.extra:
                    node_of(sets[key])
            except SyntheticSetError as err:
                raise SyntheticSetError(f"{name}: {err}") from None
        self.sets = sets
        self.step = max([recency(s) for s in sets.values()] + [self.step])
        return index

    def save(self, directory: str | Path, **extra: Any) -> Path:
        """Write the memory under `directory` (one safetensors file per set, then the index), atomically per file."""
        directory = Path(directory)
        blobs = self.dump(**extra)
        index = blobs.pop(INDEX_FILE)
        for name, data in blobs.items():
            atomic_write(directory / name, lambda f, data=data: f.write(data))
        atomic_write(directory / INDEX_FILE, lambda f: f.write(index))  # last: it names only complete files
        return directory

    def load(self, directory: str | Path, **limits: Any) -> dict[str, Any]:
        """Restore a memory written by `save` (sets checked against `limits`, as in `restore`); return its index.
        SyntheticSetError names what is wrong."""
        directory = Path(directory)
        try:
            blobs = {INDEX_FILE: (directory / INDEX_FILE).read_bytes()}
            names = json.loads(blobs[INDEX_FILE])["files"].values()
            blobs.update({name: (directory / name).read_bytes() for name in names if Path(name).name == name})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise SyntheticSetError(f"{directory / INDEX_FILE} is missing or malformed: {err}") from None
        try:
            return self.restore(blobs, **limits)
        except SyntheticSetError as err:
            raise SyntheticSetError(f"{directory}: {err}") from None


def stored_cost(images: torch.Tensor, storage: str) -> tuple[int, int]:
    """(bytes per image, bytes per set) of a hard-labelled one-class set of images shaped like `images` stored as
    `storage`: the difference between the `nbytes` of a two- and a one-image set, and what is left (a uint8 set's
    per-channel scale and offset).  A uint8 image costs one byte per pixel plus its int64 label."""
    def nbytes(n: int) -> int:
        probe = SyntheticSet(images[:1].float().repeat(n, 1, 1, 1), torch.zeros(n, dtype=torch.long),
                             SyntheticMeta(method="probe", n_classes=1, ipc=n))
        return probe.quantised(storage).nbytes

    per_image = nbytes(2) - nbytes(1)
    return per_image, nbytes(1) - per_image


def truncate(synset: SyntheticSet, ipc: int) -> SyntheticSet:
    """The first `ipc` images of every class (stable order), labels and metadata kept."""
    hard = synset.hard_labels
    rank = torch.zeros_like(hard)
    for c in synset.classes():
        members = torch.nonzero(hard == c).flatten()
        rank[members] = torch.arange(len(members))
    keep = rank < ipc
    return replace(synset, images=synset.images[keep].clone(), labels=synset.labels[keep].clone(),
                   meta=replace(synset.meta, ipc=min(ipc, synset.meta.ipc)))


def carry_soft_labels(original: SyntheticSet, compressed: SyntheticSet) -> SyntheticSet:
    """`compressed` (made from `original`'s images) with soft labels taken from `original`: every image gets the
    label of its nearest original image of the same class (itself, for herding and truncation; for re-distilled
    images, the one they moved least from when DM starts from the held images)."""
    if compressed.soft_labels:
        return compressed
    labels = torch.empty(len(compressed), original.labels.shape[1])
    source, target = original.hard_labels, compressed.hard_labels
    for c in compressed.classes():
        into, members = torch.nonzero(target == c).flatten(), torch.nonzero(source == c).flatten()
        nearest = torch.cdist(compressed.images[into].flatten(1), original.images[members].flatten(1)).argmin(dim=1)
        labels[into] = original.labels[members[nearest]].float()
    return replace(compressed, labels=labels)


def recorded(synset: SyntheticSet, **fields: int) -> SyntheticSet:
    """The set with BOOKKEEPING `fields` (task=..., step=..., absorbed=..., node=...) recorded in its metadata."""
    names = {"task": "task_label", "step": "step", "absorbed": "absorbed", "node": "node"}
    extra = {**synset.meta.extra, **{names[k]: int(v) for k, v in fields.items()}}
    return replace(synset, meta=replace(synset.meta, extra=extra))


def carry_record(original: SyntheticSet, new: SyntheticSet) -> SyntheticSet:
    """`new` (made from `original`) with `original`'s BOOKKEEPING metadata."""
    kept = {k: original.meta.extra[k] for k in BOOKKEEPING if k in original.meta.extra}
    return replace(new, meta=replace(new.meta, extra={**new.meta.extra, **kept}))


def recency(synset: SyntheticSet) -> int:
    """The step that last updated the set (0 for sets saved without one)."""
    return int(synset.meta.extra.get("step", 0))


def absorbed(synset: SyntheticSet) -> int:
    """How many real samples the set summarises (its own size for sets saved without the count)."""
    return int(synset.meta.extra.get("absorbed", len(synset)))


def class_key(task: int, cls: int) -> int:
    """The key of a class-keyed set: one per task label and class id."""
    return int(task) * MAX_CLASSES + int(cls)


def only_classes(synset: SyntheticSet, classes: list[int]) -> SyntheticSet:
    """The images (and labels) of `classes` in the set, metadata kept."""
    keep = torch.isin(synset.hard_labels, torch.tensor(classes, dtype=torch.long))
    return replace(synset, images=synset.images[keep].clone(), labels=synset.labels[keep].clone())


def topped_up(held: torch.Tensor, new: torch.Tensor, ipc: int) -> torch.Tensor:
    """The held images of a class, followed by its new samples (cycled) until there are `ipc` of them."""
    if len(held) >= ipc or len(new) == 0:
        return held[:ipc]
    extra = new[torch.arange(ipc - len(held)) % len(new)]
    return torch.cat([held, extra.to(held.dtype)])


def warm_started(distiller: Distiller, images: torch.Tensor, labels: torch.Tensor, iterations: int) -> Distiller:
    """A shallow copy of `distiller` that runs at most `iterations` iterations and, when it has DM's
    `initial_images` hook, starts from `images` (grouped by class, class ids `labels`) instead of sampling its
    start.  The distiller passed in is left as it is."""
    clone = copy.copy(distiller)
    if hasattr(clone, "iterations"):
        clone.iterations = min(int(clone.iterations), int(iterations))
    if hasattr(clone, "initial_images"):
        def start(*_: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return images.to(clone.device).contiguous(memory_format=torch.channels_last), labels.clone()
        clone.initial_images = start
    return clone


def task_label(synset: SyntheticSet) -> int:
    """The task label recorded by `recorded` (0 when absent); SyntheticSetError when it is not a valid one."""
    value = synset.meta.extra.get("task_label", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SyntheticSetError(f"metadata extra.task_label must be a non-negative integer, got {value!r}")
    return value


def node_of(synset: SyntheticSet) -> int:
    """The node recorded by `put`; SyntheticSetError when there is none or it is not a non-negative integer."""
    value = synset.meta.extra.get("node")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SyntheticSetError(f"metadata extra.node must be a non-negative integer (the node a pooled set came "
                                f"from), got {value!r}")
    return value


def as_distribution(labels: torch.Tensor) -> torch.Tensor:
    """Soft labels as probability rows: kept when they already are distributions, else read as logits."""
    labels = labels.float()
    if bool((labels >= 0).all()) and torch.allclose(labels.sum(dim=1), torch.ones(len(labels)), atol=1e-3):
        return labels
    return labels.softmax(dim=1)
