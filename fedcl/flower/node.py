"""What a client node works from: the run settings in an instruction, its partition of the data, the global model.

Shared by the ClientApp's handlers (`fedcl.flower.client_app`) and the continual-learning ones
(`fedcl.flower.continual_client`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedcl.data import ImageDataset, load_dataset, partition
from fedcl.distill import Distiller, accepted_options, create_distiller, supports_guide
from fedcl.flower.protocol import CONFIG, SERVER_ROUND, TASK
from fedcl.flower.records import arrays_to_model
from fedcl.flower.settings import FedSettings
from fedcl.models import create_model
from fedcl.runtime import seeded


@lru_cache(maxsize=2)
def _dataset(name: str, data_root: str) -> ImageDataset:
    return load_dataset(name, data_root or None)


@lru_cache(maxsize=8)
def _partition(name: str, data_root: str, n_clients: int, scheme: str, alpha: float, k: int, seed: int,
               size: int) -> tuple[torch.Tensor, ...]:
    return tuple(partition(_dataset(name, data_root).train_labels, n_clients, scheme, alpha=alpha, k=k, seed=seed,
                           size=size))


def local_data(settings: FedSettings, context: Context) -> tuple[ImageDataset, torch.Tensor, torch.Tensor, int]:
    """(dataset, images, labels, partition id) of this client's share of the training split."""
    pid = int(context.node_config.get("partition-id", 0))
    n_clients = int(context.node_config.get("num-partitions", 1))
    if not 0 <= pid < n_clients:
        raise ValueError(f"node config partition-id={pid} is outside 0..{n_clients - 1}")
    dataset = _dataset(settings.dataset, settings.data_root)
    index = _partition(settings.dataset, settings.data_root, n_clients, settings.partitioner, settings.alpha,
                       settings.classes_per_client, settings.seed, settings.client_samples)[pid]
    if index.numel() == 0:
        raise ValueError(f"partition {pid} of {n_clients} is empty")
    return dataset, dataset.train_images[index], dataset.train_labels[index], pid


def message_settings(msg: Message) -> tuple[FedSettings, int, int]:
    """(settings, server round, task) carried by an instruction's ConfigRecord: parsed once per message by the
    handler, which passes them down (task 0 outside the continual scenario)."""
    config = msg.content.config_records.get(CONFIG, {})
    return FedSettings.from_config(config), int(config.get(SERVER_ROUND, 1)), int(config.get(TASK, 0))


def client_seed(run_seed: int, pid: int, step: int) -> int:
    """The seed of partition `pid`'s work at one step (a server round, or a task for a continual memory):
    distinct for every (run seed, partition, step), so no two clients or rounds share a random stream."""
    return run_seed * 100_003 + pid * 1009 + step


def global_model(settings: FedSettings, dataset: ImageDataset, arrays: ArrayRecord) -> torch.nn.Module:
    """The run's model architecture holding the weights in `arrays`."""
    with seeded(settings.seed):
        net = create_model(settings.model, dataset.image_shape, dataset.n_classes, **settings.model_cfg)
    return arrays_to_model(net, arrays)


def client_distiller(settings: FedSettings, pid: int, step: int,
                     guide: Mapping[str, torch.Tensor] | None = None) -> Distiller:
    """The distiller the run names for this client's release at `step` (a round, or a task): the run's model and
    device, the client's seed, the settings' iterations, real batch, init and DP share where the distiller takes
    them, `guide` (the global model's weights) where it supports one, then the DP share and the run's
    `distiller-opt` when the strategy distils (a replay strategy's choice of real images, which never leaves the
    client, takes neither)."""
    name = settings.client_distiller
    accepted = accepted_options(name)
    wanted = {"iterations": settings.distill_iterations, "batch_real": settings.batch_real, "init": settings.init}
    options = {"model": settings.model, "model_cfg": settings.model_cfg, "device": settings.device,
               "seed": client_seed(settings.seed, pid, step), **{k: v for k, v in wanted.items() if k in accepted}}
    if guide is not None and supports_guide(name):
        options.update(guide=guide, guide_noise=settings.guide_noise)
    if not settings.distils:  # a replay strategy's random or herding choice of real images, kept on the client
        return create_distiller(name, **options)
    if settings.dp_epsilon > 0:
        epsilon, delta = PrivacyLedger.share(settings)
        options.update(dp_epsilon=epsilon, dp_delta=delta)
        if settings.dp_clip > 0:
            options["dp_clip"] = settings.dp_clip
    return create_distiller(name, **{**options, **settings.distiller_options()})


class PrivacyLedger:
    """A client's spent privacy budget, kept in its `Context.state` (so it spans rounds and tasks).

    The run's (dp-epsilon, dp-delta) is the client's budget over its whole run; each of its `settings.uploads`
    releases gets an even share, calibrated by the distiller, and the shares compose by addition (basic
    composition).  A client whose releases are all spent refuses to distil again and says so."""

    STATE = "fedcl-privacy"

    def __init__(self, settings: FedSettings, context: Context) -> None:
        self.settings, self.context = settings, context
        record = context.state.config_records.get(self.STATE)
        self.releases = int(record["releases"]) if record is not None else 0

    @staticmethod
    def share(settings: FedSettings) -> tuple[float, float]:
        """(epsilon, delta) of one release."""
        return settings.dp_epsilon / settings.uploads, settings.dp_delta / settings.uploads

    @property
    def spent(self) -> float:
        """Epsilon spent so far."""
        return self.releases * self.share(self.settings)[0]

    def check(self) -> None:
        """Raise ValueError (reported to the server as this client's failure) when no release is left."""
        if self.releases >= self.settings.uploads:
            raise ValueError(f"privacy budget spent: this client made its {self.releases} private releases "
                             f"(epsilon {self.spent:.4g} of {self.settings.dp_epsilon:g}) and uploads no more")

    def charge(self) -> float:
        """Count one release; returns the epsilon spent so far."""
        self.releases += 1
        self.context.state[self.STATE] = ConfigRecord({"releases": self.releases})
        return self.spent
