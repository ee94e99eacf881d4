"""The client side of federated continual learning: a task stream, a replay memory that survives, two handlers.

The ClientApp (`fedcl.flower.client_app`) routes here when the run's scenario is "continual":
- `train_task` (message `train`): load the global model and train it on the current task's local data, every
  mini-batch mixed with samples of the client's memory (and of the server's replay slice, when one was sent),
  DSA-augmented when the run sets `replay-dsa`;
- `distill_task` (message `train.distill`, at the end of a task): distil the task's data into the memory
  (`fedcl.memory.DistilledMemory`, `ipc` images per class: the run's `distiller` for fed-distill, random real
  images for fedavg-replay, real images chosen by herding for fedavg-herding; private with `dp-epsilon`, charged
  to the client's `PrivacyLedger`) and, for fed-distill-server, upload the new synthetic set.  With a
  `label-temperature` the new set's labels become soft: half its one-hot labels, half the global model's (sent
  with the request) softmax of logits / T over the classes met so far, as DER++ replays the predictions recorded
  when a sample entered memory.
  With `rehearsal-epochs` the client then trains the global model (sent with the request) on its memory alone
  and replies with the weights, which the server averages.
The memory lives in the node's `Context.state` (so it survives across rounds and tasks in a simulation) and, when
the node config names a `memory-dir`, also on disk under `memory-dir/run-<run id>/` (atomic writes), from where a
restarted SuperNode resumes it.  The server's slice is kept the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcl.data import ImageDataset
from fedcl.data.streams import class_groups, task_order
from fedcl.distill import Source
from fedcl.flower.node import PrivacyLedger, client_distiller, client_seed, global_model, local_data
from fedcl.flower.protocol import (
    ARRAYS,
    EPSILON_SPENT,
    MEMORY_IMAGES,
    METRICS,
    NUM_EXAMPLES,
    REHEARSAL_EXAMPLES,
    SYNTHETIC_IMAGES,
    SYNTHETIC_KEY,
    TASK,
    TRAIN_LOSS,
)
from fedcl.flower.records import model_to_arrays, synset_from_record, synset_to_record
from fedcl.flower.settings import FedSettings
from fedcl.memory import DistilledMemory
from fedcl.runtime import resolve_device
from fedcl.synthetic import SyntheticSet
from fedcl.train import TrainConfig, common_labels, soft_predictions, train_model

#: Context.state keys of the memory (its `dump` blobs) and of the server's replay slice (safetensors bytes).
MEMORY_STATE = "fedcl-memory"
SLICE_STATE = "fedcl-server-replay"
_SLICE_FILE = "server-replay.safetensors"


def task_data(settings: FedSettings, context: Context, task: int) -> tuple[ImageDataset, torch.Tensor, torch.Tensor,
                                                                             int, int]:
    """(dataset, images, labels, partition id, class group) of this client's share of task `task`."""
    dataset, images, labels, pid = local_data(settings, context)
    if not 0 <= task < settings.tasks:
        raise ValueError(f"task {task} is outside 0..{settings.tasks - 1}")
    group = task_order(settings.tasks, pid, settings.task_order, settings.seed)[task]
    classes = class_groups(dataset.n_classes, settings.tasks, settings.seed)[group]
    keep = torch.isin(labels, torch.tensor(classes))
    return dataset, images[keep], labels[keep], pid, group


def memory_dir(context: Context) -> Path | None:
    """Where this node keeps its memory on disk (node config `memory-dir`, one folder per run), or None."""
    root = context.node_config.get("memory-dir")
    return Path(str(root)) / f"run-{context.run_id}" if root else None


def load_memory(settings: FedSettings, context: Context) -> DistilledMemory:
    """The node's memory: from Context.state, else from its memory-dir on disk, else a new empty one."""
    memory = DistilledMemory(images_per_class=settings.ipc, seed=settings.seed)
    directory = memory_dir(context)
    if MEMORY_STATE in context.state.config_records:
        memory.restore({k: bytes(v) for k, v in context.state.config_records[MEMORY_STATE].items()})
    elif directory is not None and (directory / "memory.json").is_file():
        memory.load(directory)
    return memory


def store_memory(memory: DistilledMemory, context: Context) -> None:
    """Keep the memory in Context.state and, with a memory-dir, on disk."""
    context.state[MEMORY_STATE] = ConfigRecord(memory.dump())
    directory = memory_dir(context)
    if directory is not None:
        memory.save(directory)


def _server_slice(settings: FedSettings, msg: Message, context: Context, dataset: ImageDataset) -> SyntheticSet | None:
    """The replay slice in this message (validated; then stored), else the one stored earlier, else None."""
    limits = dict(image_shape=dataset.image_shape, n_classes=dataset.n_classes,
                  max_images=settings.ipc * dataset.n_classes)
    directory = memory_dir(context)
    if SYNTHETIC_KEY in msg.content.array_records:
        replay = synset_from_record(msg.content, **limits)
        context.state[SLICE_STATE] = ConfigRecord({"set": replay.to_bytes()})
        if directory is not None:
            replay.save(directory / _SLICE_FILE)
        return replay
    if SLICE_STATE in context.state.config_records:
        return SyntheticSet.from_bytes(bytes(context.state.config_records[SLICE_STATE]["set"]), **limits)
    if directory is not None and (directory / _SLICE_FILE).is_file():
        return SyntheticSet.load(directory / _SLICE_FILE, **limits)
    return None


def replay_data(settings: FedSettings, msg: Message, context: Context,
                dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) to replay: the client's memory plus the server's slice; None for the naive strategy."""
    if settings.memory_distiller is None:
        return None
    images, labels = load_memory(settings, context).labelled()
    parts = [(images, labels)] if len(images) else []
    replay = _server_slice(settings, msg, context, dataset) if settings.server_memory else None
    if replay is not None:
        replay = replay.decode()
        parts.append((replay.images, replay.hard_labels))
    if not parts:
        return None
    return torch.cat([p[0] for p in parts]), torch.cat(common_labels(*(p[1] for p in parts)))


def soft_labels(settings: FedSettings, msg: Message, dataset: ImageDataset, pid: int, synset: SyntheticSet,
                task: int) -> torch.Tensor:
    """Soft labels for a new memory set: the mean of its one-hot labels and the global model's softmax(logits / T)
    over the classes this client has met up to `task` (the model's untrained heads of future classes get none).
    Keeping half the mass on the true class keeps every image's class; the other half records how the model saw
    the image when it entered the memory."""
    groups = task_order(settings.tasks, pid, settings.task_order, settings.seed)[:task + 1]
    met = sorted(c for g in groups for c in class_groups(dataset.n_classes, settings.tasks, settings.seed)[g])
    net = global_model(settings, dataset, msg.content.array_records[ARRAYS])
    predicted = soft_predictions(net, synset.float_images(), temperature=settings.label_temperature, classes=met,
                                 device=resolve_device(settings.device))
    return 0.5 * torch.nn.functional.one_hot(synset.hard_labels, dataset.n_classes).float() + 0.5 * predicted


def train_task(msg: Message, context: Context, settings: FedSettings, server_round: int, task: int) -> Message:
    """FedAvg local update on task `task`, with replay; replies with the weights (weighted by the task's
    examples).  `settings`, `server_round` and `task` are what the ClientApp parsed from `msg`."""
    dataset, images, labels, pid, _ = task_data(settings, context, task)
    net = global_model(settings, dataset, msg.content.array_records[ARRAYS])
    replay = replay_data(settings, msg, context, dataset)
    n_new = int(labels.numel())
    if n_new == 0 and replay is not None:
        images, labels, replay = replay[0], replay[1], None  # nothing new here: rehearse the memory alone
    config = TrainConfig(epochs=settings.local_epochs, lr=settings.local_lr, batch_size=settings.local_batch_size,
                         decay_at=1.0, dsa=False, replay_dsa=settings.replay_dsa)
    losses = train_model(net, images, labels, config, device=resolve_device(settings.device),
                         seed=client_seed(settings.seed, pid, server_round), replay=replay,
                         replay_batch_size=settings.replay_batch_size) if len(labels) else [0.0]
    metrics = MetricRecord({NUM_EXAMPLES: n_new, TRAIN_LOSS: losses[-1], TASK: task})
    return Message(content=RecordDict({ARRAYS: model_to_arrays(net), METRICS: metrics}), reply_to=msg)


def distill_task(msg: Message, context: Context, settings: FedSettings, server_round: int, task: int) -> Message:
    """Distil task `task`'s local data into the memory (ipc images per class); upload the new set when the
    strategy keeps a server memory.  `settings`, `server_round` and `task` are what the ClientApp parsed."""
    dataset, images, labels, pid, group = task_data(settings, context, task)
    if settings.memory_distiller is None:
        raise ValueError(f"strategy {settings.strategy!r} keeps no memory; nothing to distil")
    memory = load_memory(settings, context)
    ledger = PrivacyLedger(settings, context) if settings.dp_epsilon > 0 else None
    synset = None
    if labels.numel():
        if ledger is not None:
            ledger.check()
        synset = memory.add(group, images, labels, client_distiller(settings, pid, task),
                            n_classes=dataset.n_classes, source=Source.of(dataset))
        if settings.label_temperature > 0:
            synset = memory.relabel(group, soft_labels(settings, msg, dataset, pid, synset, task))
        store_memory(memory, context)
    content = synset_to_record(synset, settings.upload_dtype) if settings.server_memory and synset else RecordDict()
    metrics = {NUM_EXAMPLES: int(labels.numel()), MEMORY_IMAGES: len(memory),
               SYNTHETIC_IMAGES: len(synset) if synset else 0, TASK: task}
    if ledger is not None:
        metrics[EPSILON_SPENT] = ledger.charge() if synset is not None else ledger.spent
    if settings.rehearses:
        metrics[REHEARSAL_EXAMPLES] = rehearse(settings, msg, context, dataset, pid, server_round, content)
    content[METRICS] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def rehearse(settings: FedSettings, msg: Message, context: Context, dataset: ImageDataset, pid: int,
             server_round: int, content: RecordDict) -> int:
    """Train the request's global model `rehearsal-epochs` epochs on the memory alone (and the server's slice),
    put its weights in `content` and return how many images it trained on (0, and no weights, when none)."""
    replay = replay_data(settings, msg, context, dataset)
    if replay is None:
        return 0
    net = global_model(settings, dataset, msg.content.array_records[ARRAYS])
    config = TrainConfig(epochs=settings.rehearsal_epochs, lr=settings.local_lr, batch_size=settings.local_batch_size,
                         decay_at=1.0, dsa=settings.replay_dsa)
    train_model(net, *replay, config, device=resolve_device(settings.device),
                seed=client_seed(settings.seed, pid, server_round))
    content[ARRAYS] = model_to_arrays(net)
    return len(replay[1])
