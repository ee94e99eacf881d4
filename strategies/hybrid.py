"""FedAvg whose aggregate is fine-tuned on a pooled memory of the clients' synthetic sets."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl.flower.protocol import DISTILL_MESSAGE, MEMORY_IMAGES
from fedcl.screen import EmbeddingScreen, create_screen
from fedcl.synthetic import MAX_BYTES
from fedcl.train import TrainConfig
from strategies.memory import SyntheticMemory, train_on_memory
from strategies.traffic import Metered


class FedAvgDistill(Metered, FedAvg):
    """Hybrid: FedAvg rounds, and after each aggregation the server fine-tunes the averaged model on a pooled
    memory of synthetic sets the clients uploaded once (in the first round, alongside their first local update).

    Under label skew the averaged model drifts toward the classes the last local updates saw; a few epochs on a
    class-balanced synthetic memory pull it back, for one extra upload of a few hundred kilobytes per client.
    Failed clients (either message) are counted in `self.traffic` with a reason; the rest are aggregated.

    Parameters
    ----------
    image_shape : tuple[int, int, int]
        (C, H, W) every synthetic image must have.
    n_classes : int
        Number of classes.
    model : str (default: "convnet")
        `fedcl.models.create_model` name of the global model.
    model_cfg : dict | None (default: None)
        Options of that model.
    finetune_config : TrainConfig (default: TrainConfig(epochs=10))
        How the server fine-tunes the aggregate on the memory after every round (epochs, lr, DSA, ...).
    distill_rounds : tuple[int, ...] (default: (1,))
        Rounds in which clients also distil and upload a synthetic set.
    memory : str (default: "latest")
        "all" keeps every uploaded set, "latest" each client's most recent one.
    max_images_per_client : int (default: 10_000)
        Largest synthetic set accepted from one client, in images.
    max_bytes_per_client : int (default: 512 MiB)
        Largest synthetic set accepted from one client, in tensor bytes.
    screen : str (default: "none")
        Poisoning screen of each round's sets before they enter the memory: "none", or "embedding" (per-class mean
        embeddings under seeded random ConvNets against the median over clients, `fedcl.screen`); outliers are
        counted as failures with the screen's reason.
    screen_threshold : float (default: 2.5)
        Score above which the "embedding" screen refuses a set (honest sets score about 1; must be > 0).
    device : str (default: "auto")
        Where the server fine-tunes.
    seed : int (default: 0)
        Seed of the fine-tuning (offset by the round).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, weighted_by_key,
    arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in Flower's `FedAvg`.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], n_classes: int, model: str = "convnet",
                 model_cfg: dict | None = None, finetune_config: TrainConfig = TrainConfig(epochs=10),
                 distill_rounds: tuple[int, ...] = (1,), memory: str = "latest",
                 max_images_per_client: int = 10_000, max_bytes_per_client: int = MAX_BYTES, screen: str = "none",
                 screen_threshold: float = EmbeddingScreen.threshold, device: str = "auto", seed: int = 0,
                 **fedavg_options) -> None:
        super().__init__(**fedavg_options)
        self.model, self.model_cfg, self.finetune_config = model, dict(model_cfg or {}), finetune_config
        self.distill_rounds, self.device, self.seed = tuple(distill_rounds), device, seed
        self.memory = SyntheticMemory(image_shape=image_shape, n_classes=n_classes, policy=memory,
                                      max_images=max_images_per_client, max_bytes=max_bytes_per_client,
                                      screen=create_screen(screen, seed=seed, threshold=screen_threshold))

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedAvgDistill: distill in rounds %s, memory=%s, screen=%s, fine-tune %s",
            self.distill_rounds, self.memory.policy, self.memory.screen, self.finetune_config)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages, plus a distillation request to the same nodes in `distill_rounds`."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if server_round in self.distill_rounds:
            content = RecordDict({self.configrecord_key: config})
            messages += [Message(content=content, message_type=DISTILL_MESSAGE, dst_node_id=m.metadata.dst_node_id)
                         for m in messages]
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the weight updates (FedAvg), store the synthetic sets, fine-tune the average on the memory."""
        replies = list(replies)
        synthetic = [r for r in replies if r.metadata.message_type == DISTILL_MESSAGE]
        updates = [r for r in replies if r.metadata.message_type != DISTILL_MESSAGE]
        self.memory.accept(server_round, synthetic, self.traffic)
        arrays, metrics = super().aggregate_train(server_round, updates)
        if arrays is not None and len(self.memory) > 0:
            arrays = train_on_memory(arrays, self.memory, model=self.model, model_cfg=self.model_cfg,
                                     config=self.finetune_config, device=self.device, seed=self.seed + server_round)
        metrics = MetricRecord({**(metrics or {}), MEMORY_IMAGES: len(self.memory),
                                **self.failure_metrics(server_round)})
        return arrays, metrics
