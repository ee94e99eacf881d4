"""One flat set of federated-run settings shared by the ServerApp, the ClientApp, `fedcl simulate` and the
`[tool.flwr.app.config]` table.

Each field has one name everywhere: `local_epochs` here is `local-epochs` in a run config, in the ConfigRecord the
server sends and in the CLI (`--local-epochs`).  The server reads the run config and forwards the whole table to the
clients inside every instruction, so clients need no configuration of their own beyond their node config
(`partition-id`, `num-partitions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Behaviour:
    """What a strategy name means: the server strategy that runs it ("fedavg", "fed-distill", "hybrid" or
    "continual"), and in the continual scenario the distiller that fills the clients' memories ("dm", "random"
    real images, None: no memory) and whether the server keeps a global memory of the uploaded sets."""

    server: str
    memory_distiller: str | None = None
    server_memory: bool = False


#: The one table from (scenario, strategy name) to behaviour.
BEHAVIOURS: dict[tuple[str, str], Behaviour] = {
    ("standard", "fedavg"): Behaviour("fedavg"),
    ("standard", "fed-distill"): Behaviour("fed-distill"),
    ("standard", "hybrid"): Behaviour("hybrid"),
    ("continual", "fedavg"): Behaviour("continual"),
    ("continual", "fedavg-replay"): Behaviour("continual", memory_distiller="random"),
    ("continual", "fed-distill"): Behaviour("continual", memory_distiller="dm"),
    ("continual", "fed-distill-server"): Behaviour("continual", memory_distiller="dm", server_memory=True),
}
#: Strategies of the standard scenario (one fixed dataset) and of the continual one (a stream of tasks per client).
STRATEGIES = tuple(name for scenario, name in BEHAVIOURS if scenario == "standard")
CONTINUAL_STRATEGIES = tuple(name for scenario, name in BEHAVIOURS if scenario == "continual")
SCENARIOS = ("standard", "continual")
TASK_ORDERS = ("shared", "per-client")
#: How weight rounds are aggregated: FedAvg's weighted mean, or Flower's robust FedMedian, FedTrimmedAvg, Krum.
AGGREGATIONS = ("mean", "median", "trimmed", "krum")


@dataclass(frozen=True)
class FedSettings:
    """Settings of a federated run (defaults: a CPU-sized run on the embedded digits dataset).

    Data: dataset, data_root ("" = the dataset's default place), partitioner (iid, dirichlet, classes), alpha
    (Dirichlet concentration), classes_per_client (k of the "classes" partitioner), seed.
    Model: model, width, depth, norm (see `fedcl.models.create_model`).
    Scenario: scenario ("standard": one dataset; "continual": every client learns a class-incremental stream of
    `tasks` tasks, see `fedcl.data.streams`, met in a "shared" or "per-client" task_order).
    Strategy: strategy (standard: fedavg, fed-distill, hybrid; continual: fedavg = naive federated fine-tuning,
    fedavg-replay = replay of random real images, fed-distill = replay of distilled images, fed-distill-server =
    distilled replay plus the server's global distilled memory), num_rounds (in the continual scenario: FedAvg
    rounds per task; a memory strategy adds one distillation round at the end of each task), fraction_train,
    fraction_evaluate, min_nodes (clients a round waits for), round_timeout (seconds: a reply later than that is
    a failure), aggregation (weight rounds of fedavg: "mean", or the robust "median", "trimmed" mean, "krum").
    Client distillation (fed-distill, hybrid; continual memories): ipc (images per class; in the continual
    scenario the memory budget: ipc images per class per client, and the size per class of the server's replay
    slice), distill_iterations, batch_real, min_class_images (fed-distill, hybrid: a client distils only the
    classes of which it holds at least this many real images; 1 = every class it has: a class held in a handful of
    images gives no more than those images, and ipc synthetic images of it cost as much as any other class),
    guide_noise (relative perturbation of the global model's weights when clients distil against it),
    upload_dtype (wire format of the synthetic images: float32, or float16 for half the uplink),
    label_temperature (continual memories: 0 keeps hard labels; T > 0 labels every new memory set with the mean of
    its one-hot labels and the global model's softmax(logits / T) over the classes met so far, see
    `fedcl.flower.continual_client.soft_labels`).
    Client training (fedavg, hybrid, continual): local_epochs, local_lr, local_batch_size, replay_batch_size
    (memory samples added to every mini-batch in the continual scenario), replay_dsa (continual: DSA-augment
    those memory samples, each with its own draw; the new task's samples stay as they are), rehearsal_epochs
    (continual memory strategies: 0 = off; else in the distillation round at each task's end every client, once
    its memory holds the new task, trains the global model that many epochs on its memory alone and the server
    averages those models, weighted by memory images: a class-balanced step after the recency-biased training).
    Server training on the pooled synthetic memory: server_epochs (fed-distill, every round), finetune_epochs
    (hybrid, after every aggregation), server_lr, server_batch_size (small pools need small batches to get
    enough steps per epoch), memory ("all" sets ever received or each client's "latest"), screen (poisoning
    screen of incoming sets: "none" or "embedding", see `fedcl.screen`), screen_threshold (the embedding screen's
    score above which a set is refused; honest sets score about 1).
    Output: out_dir (rounds.csv, plots, summary, and the server checkpoint of the last completed round),
    resume (continue from that checkpoint instead of starting over), device ("auto" = CUDA when present).
    """

    dataset: str = "digits"
    data_root: str = ""
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    seed: int = 0
    model: str = "convnet"
    width: int = 32
    depth: int = 3
    norm: str = "instancenorm"
    scenario: str = "standard"
    tasks: int = 5
    task_order: str = "shared"
    strategy: str = "fed-distill"
    num_rounds: int = 1
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_nodes: int = 2
    round_timeout: float = 3600.0
    aggregation: str = "mean"
    ipc: int = 10
    distill_iterations: int = 100
    batch_real: int = 64
    guide_noise: float = 0.05
    upload_dtype: str = "float32"
    min_class_images: int = 1
    label_temperature: float = 0.0
    local_epochs: int = 1
    local_lr: float = 0.01
    local_batch_size: int = 64
    replay_batch_size: int = 64
    replay_dsa: bool = False
    rehearsal_epochs: int = 0
    server_epochs: int = 100
    finetune_epochs: int = 10
    server_lr: float = 0.01
    server_batch_size: int = 64
    memory: str = "all"
    screen: str = "none"
    screen_threshold: float = 2.5
    out_dir: str = "runs/flower"
    resume: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; choose one of {list(SCENARIOS)}")
        allowed = CONTINUAL_STRATEGIES if self.scenario == "continual" else STRATEGIES
        if self.strategy not in allowed:
            raise ValueError(f"unknown strategy {self.strategy!r} for the {self.scenario} scenario; choose one of "
                             f"{list(allowed)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.aggregation != "mean" and self.behaviour.server != "fedavg":
            raise ValueError(f"aggregation {self.aggregation!r} works for the standard fedavg strategy only")
        if self.task_order not in TASK_ORDERS:
            raise ValueError(f"task-order must be one of {list(TASK_ORDERS)}, got {self.task_order!r}")
        if self.upload_dtype not in ("float32", "float16"):
            raise ValueError(f"upload-dtype must be 'float32' or 'float16', got {self.upload_dtype!r}")
        if self.min_class_images < 1:
            raise ValueError(f"min-class-images must be >= 1, got {self.min_class_images}")
        if self.rehearsal_epochs < 0:
            raise ValueError(f"rehearsal-epochs must be >= 0 (0 = no rehearsal round), got {self.rehearsal_epochs}")
        if self.label_temperature < 0:
            raise ValueError(f"label-temperature must be >= 0 (0 = hard labels), got {self.label_temperature}")
        if self.memory not in ("all", "latest"):
            raise ValueError(f"memory must be 'all' or 'latest', got {self.memory!r}")
        if self.screen != "none":
            _check_screen(self.screen)
        if not self.screen_threshold > 0:
            raise ValueError(f"screen-threshold must be > 0 (honest sets score about 1), got {self.screen_threshold}")
        if self.resume and self.scenario == "continual":
            raise ValueError("resume works in the standard scenario only; a continual run restarts from task 1 "
                             "(its clients' memories persist on their own, see memory-dir)")
        if min(self.num_rounds, self.ipc, self.min_nodes, self.tasks, self.replay_batch_size) < 1:
            raise ValueError("num-rounds, ipc, min-nodes, tasks and replay-batch-size must be >= 1")

    @property
    def model_cfg(self) -> dict[str, Any]:
        """Options for `create_model(self.model, ...)`."""
        if self.model == "convnet":
            return {"width": self.width, "depth": self.depth, "norm": self.norm}
        if self.model == "mlp":
            return {"width": self.width, "depth": self.depth}
        return {}

    @property
    def behaviour(self) -> Behaviour:
        """What the strategy name means in this scenario (`BEHAVIOURS`)."""
        return BEHAVIOURS[self.scenario, self.strategy]

    @property
    def memory_distiller(self) -> str | None:
        """Continual scenario: the distiller that fills the clients' memories ("dm", "random" real images) or
        None when the strategy keeps no memory."""
        return self.behaviour.memory_distiller

    @property
    def unread_keys(self) -> frozenset[str]:
        """Continual scenario: kebab-case keys this strategy never reads (DM's options when the memory is not
        distilled), so that a benchmark can reuse, say, a random-replay run across DM settings."""
        dm_options = frozenset({"distill-iterations", "batch-real"})
        return dm_options if self.scenario == "continual" and self.memory_distiller != "dm" else frozenset()

    @property
    def rehearses(self) -> bool:
        """Continual scenario: the distillation round also trains and averages the model on the memories."""
        return self.rehearsal_epochs > 0 and self.memory_distiller is not None

    @property
    def server_memory(self) -> bool:
        """Continual scenario: clients upload their new synthetic sets to the server's global memory."""
        return self.behaviour.server_memory

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> FedSettings:
        """Read kebab-case keys (a run config or a ConfigRecord), ignoring keys it does not know (such as
        `server-round`); values are converted to each field's type; `overrides` (snake_case) win."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                values[f.name] = _coerce(config[key], type(getattr(_DEFAULTS, f.name)), key)
        return cls(**{**values, **overrides})

    def to_config(self) -> dict[str, Any]:
        """The settings as kebab-case keys with str/int/float values (fits a ConfigRecord or a run config)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


def _check_screen(name: str) -> None:
    """Raise ValueError unless `name` is a known screen (imported here: loading torch would slow the CLI)."""
    from fedcl.screen import SCREENS

    if name not in SCREENS:
        raise ValueError(f"screen must be one of {list(SCREENS)}, got {name!r}")


def _coerce(value: Any, kind: type, key: str) -> Any:
    try:
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float for an int
        raise ValueError(f"config key {key!r} must be of type {kind.__name__}, got {value!r}") from None


_DEFAULTS = FedSettings()


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                     ignore: frozenset[str] = frozenset()) -> list[str]:
    """The kebab-case keys (outside `ignore`) whose values differ between two `to_config()` dicts.

    A key missing from `saved` is a setting added after it was written: it counts as its default value, so a
    checkpoint or a benchmark result written before that setting existed still matches a run that leaves it at
    its default."""
    defaults = _DEFAULTS.to_config()
    return sorted(k for k in set(saved) | set(current)
                  if k not in ignore and saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k)))
