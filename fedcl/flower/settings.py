"""One flat set of federated-run settings shared by the ServerApp, the ClientApp, `fedcl simulate` and the
`[tool.flwr.app.config]` table.

Each field has one name everywhere: `local_epochs` here is `local-epochs` in a run config, in the ConfigRecord the
server sends and in the CLI (`--local-epochs`).  The server reads the run config and forwards the whole table to the
clients inside every instruction, so clients need no configuration of their own beyond their node config
(`partition-id`, `num-partitions`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Behaviour:
    """What a strategy name means: the server strategy that runs it ("fedavg", "fed-distill", "hybrid" or
    "continual"), in the continual scenario what fills the clients' memories ("distilled": the run's `distiller`,
    "random": random real images, "herding": real images chosen by herding, None: no memory), and whether the
    server keeps a global memory of the uploaded sets."""

    server: str
    memory: str | None = None
    server_memory: bool = False


#: The one table from (scenario, strategy name) to behaviour.
BEHAVIOURS: dict[tuple[str, str], Behaviour] = {
    ("standard", "fedavg"): Behaviour("fedavg"),
    ("standard", "fed-distill"): Behaviour("fed-distill"),
    ("standard", "hybrid"): Behaviour("hybrid"),
    ("continual", "fedavg"): Behaviour("continual"),
    ("continual", "fedavg-replay"): Behaviour("continual", memory="random"),
    ("continual", "fedavg-herding"): Behaviour("continual", memory="herding"),
    ("continual", "fed-distill"): Behaviour("continual", memory="distilled"),
    ("continual", "fed-distill-server"): Behaviour("continual", memory="distilled", server_memory=True),
}
#: Strategies of the standard scenario (one fixed dataset) and of the continual one (a stream of tasks per client).
STRATEGIES = tuple(name for scenario, name in BEHAVIOURS if scenario == "standard")
CONTINUAL_STRATEGIES = tuple(name for scenario, name in BEHAVIOURS if scenario == "continual")
SCENARIOS = ("standard", "continual")
TASK_ORDERS = ("shared", "per-client")
#: How weight rounds are aggregated: FedAvg's weighted mean, or Flower's robust FedMedian, FedTrimmedAvg, Krum.
AGGREGATIONS = ("mean", "median", "trimmed", "krum")


def _setting(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
             cli: bool = True, repeat: bool = False) -> Any:
    """A FedSettings field with its one help text; `flag` renames its command-line option (default: the
    kebab-case field name), `choices` limits it, `cli=False` keeps it off the command line, and `repeat` makes
    the option repeatable (its values joined with commas)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli,
                                            "repeat": repeat})


@dataclass(frozen=True)
class FedSettings:
    """Settings of a federated run (defaults: a CPU-sized run on the embedded digits dataset).

    Each field's help text is its metadata, so that `add_arguments` builds `fedcl simulate`'s options from this one
    table and the settings table in docs/flower.md is `settings_table()`'s output.
    """

    dataset: str = _setting("digits", "digits (embedded), fashion-mnist, mnist, cifar10")
    data_root: str = _setting("", "directory with the dataset files (empty: the dataset's default place)")
    partitioner: str = _setting("dirichlet", "how the training split is shared out: iid, dirichlet (each class "
                                "split across clients by Dirichlet(alpha) proportions), dirichlet-sized (every "
                                "client the same number of samples, its class mix from Dirichlet(alpha * class "
                                "shares); for many small clients), classes",
                                choices=("iid", "dirichlet", "dirichlet-sized", "classes"))
    alpha: float = _setting(0.5, "Dirichlet concentration of the dirichlet and dirichlet-sized partitioners")
    client_samples: int = _setting(0, "dirichlet-sized: training samples per client (0: the training split shared "
                                   "out, n // clients)")
    classes_per_client: int = _setting(2, "k of the classes partitioner: classes per client")
    seed: int = _setting(0, "seed of partitions, models and distillation (never of DP noise)")
    model: str = _setting("convnet", "global model: convnet, mlp, lenet")
    width: int = _setting(32, "ConvNet/MLP width (CPU-sized)")
    depth: int = _setting(3, "ConvNet/MLP depth")
    norm: str = _setting("instancenorm", "ConvNet normalisation (see fedcl.models.create_model)")
    scenario: str = _setting("standard", "standard: one dataset; continual: every client learns a "
                             "class-incremental stream of tasks (fedcl.data.streams)", choices=SCENARIOS)
    tasks: int = _setting(5, "continual: tasks, equal class groups")
    task_order: str = _setting("shared", "continual: every client meets the tasks in the same order (shared) or "
                               "in its own (per-client)", choices=TASK_ORDERS)
    strategy: str = _setting("fed-distill", f"standard: {', '.join(STRATEGIES)}; continual: "
                             f"{', '.join(CONTINUAL_STRATEGIES)} (fedavg = naive fine-tuning, fedavg-replay = random "
                             "real-image replay, fedavg-herding = real images chosen by herding, fed-distill = "
                             "distilled replay, fed-distill-server = distilled replay plus the server's global "
                             "memory)",
                             choices=tuple(sorted({*STRATEGIES, *CONTINUAL_STRATEGIES})))
    num_rounds: int = _setting(1, "standard: federated rounds (1: one-shot FedDistill)", flag="--rounds")
    rounds_per_task: int = _setting(2, "continual: FedAvg rounds per task (memory strategies add one distillation "
                                    "round per task)")
    fraction_train: float = _setting(1.0, "fraction of clients sampled for training each round")
    fraction_evaluate: float = _setting(0.0, "fraction of clients that also evaluate the global model locally")
    min_nodes: int = _setting(2, "clients a round waits for (fedcl simulate: --clients)", cli=False)
    round_timeout: float = _setting(3600.0, "seconds: a reply later than that is a failure")
    aggregation: str = _setting("mean", "weight rounds of the standard fedavg: FedAvg's weighted mean, or Flower's "
                                "robust median, trimmed mean, krum", choices=AGGREGATIONS)
    ipc: int = _setting(10, "synthetic images per class per client; continual: the memory budget (ipc images per "
                        "class per client) and the size per class of the server's replay slice")
    distiller: str = _setting("dm", "what clients distil with (fed-distill, hybrid, continual fed-distill*): any "
                              "registered distiller, see `fedcl distill --list` (herding and random keep real "
                              "images)")
    distiller_opt: str = _setting("", "further options of the distiller as KEY=VALUE (repeatable; e.g. factor=2, "
                                  "storage=uint8, lr_img=0.5); run config: comma-separated", repeat=True)
    init: str = _setting("noise", "where client distillation starts: noise (private) or real: random local images "
                         "of each class, which uploads near-copies of the clients' images", choices=("noise", "real"))
    distill_iterations: int = _setting(100, "client distillation iterations")
    batch_real: int = _setting(64, "real images per class per distillation iteration")
    guide_noise: float = _setting(0.05, "relative perturbation of the global model's weights when clients distil "
                                  "against it (dm from round 2 of fed-distill)")
    dp_epsilon: float = _setting(0.0, "differential privacy: each client's epsilon over all its distillations "
                                 "(rounds and tasks), split evenly between them; 0: off (DM-family distillers)")
    dp_delta: float = _setting(1e-5, "differential privacy: each client's delta over all its distillations")
    dp_clip: float = _setting(0.0, "differential privacy: L2 clip norm of each real embedding (0: the "
                              "distiller's default)")
    audit: bool = _setting(True, "count near-copies of training images in every uploaded set (fedcl.audit; the "
                           "server needs the training split, as in simulations)")
    upload_dtype: str = _setting("float32", "wire format of uploaded synthetic images (float16 halves the uplink)",
                                 choices=("float32", "float16"))
    min_class_images: int = _setting(1, "fed-distill, hybrid: distil only the classes a client holds at least "
                                     "this many real images of (1: all)")
    label_temperature: float = _setting(0.0, "continual memories: 0 keeps hard labels; T > 0 labels each new set "
                                        "with the mean of its one-hot labels and the global model's "
                                        "softmax(logits / T)")
    local_epochs: int = _setting(5, "client training epochs per round (fedavg, hybrid, continual)")
    local_lr: float = _setting(0.05, "local SGD learning rate")
    local_batch_size: int = _setting(16, "local mini-batch size")
    replay_batch_size: int = _setting(16, "continual: memory samples added to every local mini-batch")
    replay_dsa: bool = _setting(False, "continual: DSA-augment the memory samples of every local mini-batch")
    rehearsal_epochs: int = _setting(0, "continual memory strategies: at each task's end every client trains the "
                                     "global model this many epochs on its memory alone and the server averages "
                                     "them, weighted by memory images (0: off)")
    server_epochs: int = _setting(100, "fed-distill: server epochs on the pooled memory per round")
    finetune_epochs: int = _setting(10, "hybrid and fed-distill-server: server fine-tuning epochs per round")
    server_lr: float = _setting(0.01, "learning rate of server training on the pooled memory")
    server_batch_size: int = _setting(64, "mini-batch of server training (small pools need small batches)")
    memory: str = _setting("all", "pooled memory: all sets ever received, or each client's latest",
                           choices=("all", "latest"))
    screen: str = _setting("none", "poisoning screen of incoming synthetic sets: none or embedding (fedcl.screen)")
    screen_threshold: float = _setting(2.5, "embedding screen: score above which a set is refused (honest sets "
                                       "score about 1)")
    out_dir: str = _setting("runs/flower", "output directory: rounds.csv, plots, summary and the server "
                            "checkpoint of the last completed round", flag="--out")
    resume: bool = _setting(False, "continue from the checkpoint of the last completed round under the output "
                            "directory (same settings)")
    device: str = _setting("auto", "auto (CUDA when present), cpu, cuda[:i]")

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
        if self.dp_epsilon < 0 or not 0 < self.dp_delta < 1 or self.dp_clip < 0:
            raise ValueError("dp-epsilon and dp-clip must be >= 0 (0: off / default) and dp-delta in (0, 1)")
        if self.dp_epsilon > 0 and not self.distils:
            raise ValueError(f"dp-epsilon: strategy {self.strategy!r} distils nothing (differential privacy applies "
                             "to the sets clients distil)")
        if self.distils and (self.distiller != "dm" or self.distiller_opt or self.dp_epsilon > 0):  # else known good
            _check_distiller(self.client_distiller, self.distiller_options(),
                             private=self.dp_epsilon > 0, init=self.init)
        if self.resume and self.scenario == "continual":
            raise ValueError("resume works in the standard scenario only; a continual run restarts from task 1 "
                             "(its clients' memories persist on their own, see memory-dir)")
        if self.client_samples < 0 or (self.client_samples and self.partitioner != "dirichlet-sized"):
            raise ValueError(f"client-samples must be >= 0 and is for the dirichlet-sized partitioner only, got "
                             f"{self.client_samples} with {self.partitioner!r}")
        if min(self.num_rounds, self.rounds_per_task, self.ipc, self.min_nodes, self.tasks,
               self.replay_batch_size) < 1:
            raise ValueError("num-rounds, rounds-per-task, ipc, min-nodes, tasks and replay-batch-size must be >= 1")

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
        """Continual scenario: the distiller that fills the clients' memories (the run's `distiller`, or the
        "random" or "herding" choice of real images) or None when the strategy keeps no memory."""
        return {"distilled": self.distiller, "random": "random", "herding": "herding",
                None: None}[self.behaviour.memory]

    @property
    def distils(self) -> bool:
        """Whether clients run a distiller (every strategy but fedavg and the naive or random-replay continual
        ones)."""
        return self.behaviour.server in ("fed-distill", "hybrid") or self.behaviour.memory == "distilled"

    @property
    def client_distiller(self) -> str:
        """The distiller a client runs: `distiller` where the strategy distils, else the memory's ("random" or
        "herding")."""
        return self.distiller if self.distils else (self.memory_distiller or "random")

    @property
    def uploads(self) -> int:
        """Distillations each client makes in a full run (one per round of fed-distill, one in hybrid's first
        round, one per task in the continual scenario): the releases its privacy budget is split between."""
        return {"fed-distill": self.num_rounds, "hybrid": 1}.get(self.behaviour.server, self.tasks)

    def distiller_options(self) -> dict[str, Any]:
        """`distiller_opt` as keyword options: KEY=VALUE pairs separated by commas, each VALUE read as JSON
        (numbers, true/false, null) or else kept as a string."""
        options: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in self.distiller_opt.split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip().isidentifier():
                raise ValueError(f"distiller-opt expects KEY=VALUE pairs, got {pair!r}")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
        return options

    @property
    def unread_keys(self) -> frozenset[str]:
        """Continual scenario: kebab-case keys this strategy never reads (the distiller's options when the
        memory is not distilled), so that a benchmark can reuse, say, a random-replay run across DM settings."""
        options = frozenset({"distill-iterations", "batch-real", "distiller", "distiller-opt", "init", "dp-epsilon",
                             "dp-delta", "dp-clip"})
        return options if self.scenario == "continual" and not self.distils else frozenset()

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


def _check_distiller(name: str, options: Mapping[str, Any], *, private: bool, init: str) -> None:
    """Raise ValueError unless `name` is a registered distiller taking `options` (and, for a private run,
    differential privacy); imported here, like the screens, to keep torch out of the CLI's start-up."""
    from fedcl.distill import accepted_options, available_distillers

    if name not in available_distillers():
        raise ValueError(f"unknown distiller {name!r}; choose one of {available_distillers()}")
    accepted = accepted_options(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"distiller-opt: {name} does not take {unknown}; it takes {sorted(accepted)}")
    if private and "dp_epsilon" not in accepted:
        raise ValueError(f"dp-epsilon: differential privacy is implemented for the DM family, not {name!r}")
    if private and init == "real":
        raise ValueError("dp-epsilon needs init noise: a start from real images would upload private images")


def _coerce(value: Any, kind: type, key: str) -> Any:
    try:
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float for an int
        raise ValueError(f"config key {key!r} must be of type {kind.__name__}, got {value!r}") from None


_DEFAULTS = FedSettings()


def _cli_fields() -> list:
    return [f for f in fields(FedSettings) if f.metadata.get("cli", True)]


def _flag(f: Any) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
    """Add one command-line option per FedSettings field (its flag, type, choices and help from the field), with
    `defaults` (snake_case) replacing the dataclass defaults where a command wants other ones."""
    defaults = defaults or {}
    for f in _cli_fields():
        default = defaults.get(f.name, getattr(_DEFAULTS, f.name))
        text = f"{f.metadata['help']} (default {default!r})"
        if f.metadata.get("repeat"):
            parser.add_argument(_flag(f), dest=f.name, action="append", default=None, metavar="KEY=VALUE",
                                help=text)
        elif isinstance(default, bool):
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(_flag(f), dest=f.name, action=action, default=default, help=text)
        else:
            parser.add_argument(_flag(f), dest=f.name, type=type(getattr(_DEFAULTS, f.name)), default=default,
                                choices=f.metadata.get("choices"), help=text)


def from_args(args: argparse.Namespace, **overrides: Any) -> FedSettings:
    """The FedSettings of a command line built by `add_arguments` (`overrides` win; ValueError on a bad value)."""
    values = {f.name: getattr(args, f.name) for f in _cli_fields()}
    for f in _cli_fields():
        if f.metadata.get("repeat"):
            given = values[f.name]
            values[f.name] = getattr(_DEFAULTS, f.name) if given is None else ",".join(given)
    return FedSettings(**{**values, **overrides})


def settings_table() -> str:
    """A markdown table of every setting: run-config key, command-line flag, default and meaning."""
    rows = ["| run-config key | `fedcl simulate` | default | meaning |", "| --- | --- | --- | --- |"]
    for f in fields(FedSettings):
        flag = f"`{_flag(f)}`" if f.metadata.get("cli", True) else "-"
        rows.append(f"| `{f.name.replace('_', '-')}` | {flag} | `{getattr(_DEFAULTS, f.name)!r}` | "
                    f"{f.metadata['help']} |")
    return "\n".join(rows)


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                     ignore: frozenset[str] = frozenset()) -> list[str]:
    """The kebab-case keys (outside `ignore`) whose values differ between two `to_config()` dicts.

    A key missing from `saved` is a setting added after it was written: it counts as its default value, so a
    checkpoint or a benchmark result written before that setting existed still matches a run that leaves it at
    its default."""
    defaults = _DEFAULTS.to_config()
    return sorted(k for k in set(saved) | set(current)
                  if k not in ignore and saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k)))
