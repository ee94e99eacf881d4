"""Federated continual learning: FedAvg over a stream of tasks, with the clients' replay memories and optionally a
global distilled memory on the server."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedcl.data import ClassIndex
from fedcl.flower.protocol import ARRAYS, MAX_COUNT, MEMORY_IMAGES, METRICS, REHEARSAL_EXAMPLES, SYNTHETIC_KEY, TASK
from fedcl.flower.records import max_set_bytes, synset_to_record
from fedcl.runtime import generator as make_generator
from fedcl.synthetic import SyntheticMeta, SyntheticSet
from fedcl.train import TrainConfig
from strategies.boundary import admit, array_problem, layout, metric_problem
from strategies.fed_distill import distill_reply_problem, distill_requests
from strategies.memory import MemoryTraining, ServerTraining, SyntheticMemory
from strategies.metered import Metered, MetricsAggregation


@dataclass(frozen=True)
class TaskSchedule:
    """Which task and which phase every server round belongs to.

    Each task has `rounds_per_task` FedAvg rounds ("train") and, when the clients keep a memory, one more round
    ("distill") in which they distil the task's data into it.  Rounds count from 1.
    """

    rounds_per_task: int
    tasks: int
    distill_round: bool

    @property
    def rounds_in_task(self) -> int:
        return self.rounds_per_task + int(self.distill_round)

    @property
    def num_rounds(self) -> int:
        return self.tasks * self.rounds_in_task

    def task_of(self, server_round: int) -> int:
        """The task a round belongs to (round 0, before training, counts as task 0)."""
        return max(0, server_round - 1) // self.rounds_in_task

    def phase(self, server_round: int) -> str:
        """"train" or "distill"."""
        within = (server_round - 1) % self.rounds_in_task
        return "distill" if within == self.rounds_per_task else "train"

    def last_round(self, task: int) -> int:
        """The task's last round: the model after it is the one the task is scored on."""
        return (task + 1) * self.rounds_in_task

    def is_task_start(self, server_round: int) -> bool:
        return (server_round - 1) % self.rounds_in_task == 0


class ContinualFedAvg(Metered, FedAvg):
    """FedAvg over a class-incremental stream of tasks on every client.

    Train rounds are FedAvg's (the clients train on their current task with replay of their memory; the
    `config` sent carries the task number).  With `schedule.distill_round` every task ends with a round in which
    the clients distil the task into their memory (message type `train.distill`).  With `server_memory` the
    clients also upload the new synthetic sets in that round; the server keeps every valid set (a global distilled
    memory of all classes seen anywhere), fine-tunes the global model on it at the end of each task, and at the
    start of the next task sends each client a class-balanced slice of it for the classes that client never had
    (at most `slice_ipc` images per class), which the client replays beside its own memory.  With `rehearse` the
    distillation request carries the global model; the clients train it on their memories alone and the task's
    model becomes the average of theirs (weighted by the images each rehearsed; then fine-tuned on the server
    memory when there is one).

    Parameters
    ----------
    schedule : TaskSchedule
        Tasks, FedAvg rounds per task and whether each task ends with a distillation round.
    image_shape, n_classes :
        What every uploaded set must match.
    server_memory : bool (default: False)
        Keep the uploaded sets, fine-tune on them and send slices back (needs `schedule.distill_round`).
    model, model_cfg :
        `fedcl.models.create_model` name and options of the global model (for the fine-tuning).
    finetune_config : TrainConfig (default: TrainConfig(epochs=10, decay_at=1.0))
        How the server fine-tunes the global model on its memory at the end of a task.
    distill_with_model : bool (default: False)
        The distillation request also carries the global model (clients that label their memory with it need it;
        it counts in the downlink).
    rehearse : bool (default: False)
        Average the models the clients return from the distillation round (needs `schedule.distill_round`).
    slice_ipc : int (default: 10)
        Images per class in the replay slice sent to a client.
    max_images_per_client, max_bytes_per_client :
        Largest set accepted from one client in one upload (bytes None: derived from the expected size,
        `fedcl.flower.records.max_set_bytes`).
    pixel_range : tuple[float, float] | None (default: None)
        Lowest and highest pixel value an uploaded image may hold; None accepts any finite value.
    device, seed :
        Where the server fine-tunes and the seed of the fine-tuning and of the slices.
    audit : Callable[[SyntheticSet], int] | None (default: None)
        Counts the near-copies of training images in an uploaded set (`fedcl.audit.Auditor.near_copies`, for a
        server that holds the training split, as in simulations); the counts by round are `memory.near_copies`.
    server_training : ServerTraining | None (default: None)
        How the server trains on its pooled memory: a callable (arrays, memory, server round) -> arrays, e.g. a
        user's own trainer; None trains the global model with `MemoryTraining`
        (model, model_cfg, finetune_config, device, seed).
    max_examples : int
        As in `strategies.metered.Metered`: the most examples one reply may weigh (larger claims are clipped).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, weighted_by_key,
    arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in Flower's `FedAvg`, with its defaults (1.0, 1.0, 2, 2, 2, "num-examples", "arrays", "config", None,
        None), and passed to it: an unknown keyword is a TypeError.
    """

    def __init__(self, *, schedule: TaskSchedule, image_shape: tuple[int, int, int], n_classes: int,
                 server_memory: bool = False, model: str = "convnet", model_cfg: dict | None = None,
                 finetune_config: TrainConfig = TrainConfig(epochs=10, decay_at=1.0),
                 distill_with_model: bool = False, rehearse: bool = False, slice_ipc: int = 10,
                 max_images_per_client: int = 10_000, max_bytes_per_client: int | None = None,
                 pixel_range: tuple[float, float] | None = None, device: str = "auto", seed: int = 0,
                 max_examples: int = MAX_COUNT, audit: Callable[[SyntheticSet], int] | None = None,
                 server_training: ServerTraining | None = None,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: MetricsAggregation | None = None,
                 evaluate_metrics_aggr_fn: MetricsAggregation | None = None) -> None:
        if server_memory and not schedule.distill_round:
            raise ValueError("a server memory needs a distillation round at the end of every task")
        if rehearse and not schedule.distill_round:
            raise ValueError("rehearsal happens in the distillation round at the end of every task")
        super().__init__(max_examples=max_examples, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
                         arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
                         train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        self.schedule, self.server_memory, self.slice_ipc = schedule, server_memory, slice_ipc
        self.distill_with_model, self.rehearse = distill_with_model or rehearse, rehearse
        self.model, self.model_cfg, self.finetune_config = model, dict(model_cfg or {}), finetune_config
        self.device, self.seed = device, seed
        self.server_training = server_training or MemoryTraining(model, finetune_config, self.model_cfg, device,
                                                                 seed)
        self.memory = SyntheticMemory(
            image_shape=image_shape, n_classes=n_classes, policy="all", max_images=max_images_per_client,
            max_bytes=max_bytes_per_client or max_set_bytes(image_shape, n_classes, max_images_per_client),
            pixel_range=pixel_range, audit=audit)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> ContinualFedAvg: %s, server memory=%s, rehearse=%s", self.schedule, self.server_memory,
            self.rehearse)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages for the current task (with replay slices at a task's start), or the
        distillation request at its end."""
        config[TASK] = self.schedule.task_of(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.schedule.phase(server_round) == "distill":
            return distill_requests(messages, self.arrayrecord_key, self.distill_with_model)
        if not (self.server_memory and self.schedule.is_task_start(server_round) and len(self.memory)):
            return messages
        return [self._with_slice(m, server_round) for m in messages]

    def _with_slice(self, message: Message, server_round: int) -> Message:
        """The train message plus a replay slice of the classes its node never uploaded (unchanged if none)."""
        node = int(message.metadata.dst_node_id)
        images, labels = self.memory.pooled()
        own = {c for s in self.memory.sets.get(node, []) for c in s.classes()}
        missing = sorted(set(labels.tolist()) - own)
        if not missing:
            return message
        keep = torch.isin(labels, torch.tensor(missing))
        picks, _ = ClassIndex(labels[keep], self.memory.n_classes).sample(
            self.slice_ipc, make_generator(self.seed * 1009 + server_round * 31 + node % 100_003))
        meta = SyntheticMeta(method="server-slice", n_classes=self.memory.n_classes, ipc=self.slice_ipc)
        replay = SyntheticSet(images[keep][picks], labels[keep][picks], meta)
        content = RecordDict({**message.content, **synset_to_record(replay)})
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg in train rounds; in a distillation round, average the rehearsed models, store the uploaded sets
        and fine-tune on them."""
        if self.schedule.phase(server_round) == "train":
            return super().aggregate_train(server_round, replies)
        replies = admit(server_round, replies, self.traffic, self._distill_reply_problem)
        arrays = self._rehearsed(replies) if self.rehearse else None
        if not self.server_memory:
            self.memory.note_privacy(replies)
        else:
            self.memory.accept(server_round, replies, self.traffic)
            start = arrays if arrays is not None else self.sent_arrays
            if len(self.memory) and start is not None:
                arrays = self.server_training(start, self.memory, server_round)
        client_memory = sum(r.content[METRICS].get(MEMORY_IMAGES, 0) for r in replies)
        metrics = MetricRecord({"clients-ok": len(replies), "server-memory-images": len(self.memory),
                                "client-memory-images": client_memory, **self.failure_metrics(server_round)})
        return arrays, metrics

    def _distill_reply_problem(self, reply: Message) -> str | None:
        """Why a reply to the end-of-task distillation request breaks the protocol, or None: a synthetic set only
        with a server memory, a rehearsed model (shaped like the one sent, finite) only with rehearsal, and the
        protocol's metrics of a memory client."""
        optional = frozenset({ARRAYS} if self.rehearse else ())
        problem = distill_reply_problem(reply, optional) or metric_problem(
            reply.content[METRICS], required=(MEMORY_IMAGES, TASK) + ((REHEARSAL_EXAMPLES,) if self.rehearse else ()))
        if problem is None and SYNTHETIC_KEY in reply.content.array_records and not self.server_memory:
            problem = "reply uploads a synthetic set, but this strategy keeps no server memory"
        if problem is None and ARRAYS in reply.content.array_records:
            if self.sent_arrays is None:
                return "reply carries a model, but none was sent"
            problem = array_problem(reply.content.array_records[ARRAYS], layout(self.sent_arrays))
        return problem

    def _rehearsed(self, replies: list[Message]) -> ArrayRecord | None:
        """The average of the models the (admitted) clients rehearsed on their memories, weighted by the images
        each trained on (clipped to `max_examples`); None when no client returned a model."""
        records = []
        for reply in replies:
            examples = min(reply.content[METRICS][REHEARSAL_EXAMPLES], self.max_examples)
            if ARRAYS in reply.content.array_records and examples > 0:
                records.append(RecordDict({ARRAYS: reply.content.array_records[ARRAYS],
                                           METRICS: MetricRecord({REHEARSAL_EXAMPLES: examples})}))
        return aggregate_arrayrecords(records, REHEARSAL_EXAMPLES) if records else None
