"""FedAvg whose aggregate is fine-tuned on a pooled memory of the clients' synthetic sets."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl.flower.protocol import DISTILL_MESSAGE, MAX_COUNT, MEMORY_IMAGES
from fedcl.flower.records import max_set_bytes
from fedcl.screen import EmbeddingScreen, create_screen
from fedcl.synthetic import SyntheticSet
from fedcl.train import TrainConfig
from strategies.boundary import admit
from strategies.fed_distill import distill_reply_problem, distill_requests
from strategies.memory import MemoryTraining, ServerTraining, SyntheticMemory
from strategies.metered import Metered, MetricsAggregation


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
    max_bytes_per_client : int | None (default: None)
        Largest reply accepted from one client (tensor bytes plus metadata); None derives it from the expected
        size, `fedcl.flower.records.max_set_bytes` of `max_images_per_client`.
    pixel_range : tuple[float, float] | None (default: None)
        Lowest and highest pixel value a synthetic image may hold; None accepts any finite value.
    screen : str (default: "none")
        Poisoning screen of each round's sets before they enter the memory: "none", or "embedding" (per-class mean
        embeddings under random ConvNets seeded from server-side secret randomness, against the median over
        clients, `fedcl.screen`); outliers are counted as failures with the screen's reason.
    screen_threshold : float (default: 2.5)
        Score above which the "embedding" screen refuses a set (honest sets score about 1; must be > 0).
    device : str (default: "auto")
        Where the server fine-tunes.
    seed : int (default: 0)
        Seed of the fine-tuning (offset by the round).
    audit : Callable[[SyntheticSet], int] | None (default: None)
        Counts the near-copies of training images in an uploaded set (`fedcl.audit.Auditor.near_copies`, for a
        server that holds the training split, as in simulations); the counts by round are `memory.near_copies`.
    server_training : ServerTraining | None (default: None)
        How the server trains on its pooled memory: a callable (arrays, memory, server round) -> arrays, e.g. a
        user's own trainer; None trains the average with `MemoryTraining`
        (model, model_cfg, finetune_config, device, seed).
    max_examples : int
        As in `strategies.metered.Metered`: the most examples one reply may weigh (larger claims are clipped).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, weighted_by_key,
    arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in Flower's `FedAvg`, with its defaults (1.0, 1.0, 2, 2, 2, "num-examples", "arrays", "config", None,
        None), and passed to it: an unknown keyword is a TypeError.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], n_classes: int, model: str = "convnet",
                 model_cfg: dict | None = None, finetune_config: TrainConfig = TrainConfig(epochs=10),
                 distill_rounds: tuple[int, ...] = (1,), memory: str = "latest",
                 max_images_per_client: int = 10_000, max_bytes_per_client: int | None = None,
                 pixel_range: tuple[float, float] | None = None, screen: str = "none",
                 screen_threshold: float = EmbeddingScreen.threshold, device: str = "auto", seed: int = 0,
                 audit: Callable[[SyntheticSet], int] | None = None,
                 server_training: ServerTraining | None = None, max_examples: int = MAX_COUNT,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: MetricsAggregation | None = None,
                 evaluate_metrics_aggr_fn: MetricsAggregation | None = None) -> None:
        self.model, self.model_cfg, self.finetune_config = model, dict(model_cfg or {}), finetune_config
        super().__init__(max_examples=max_examples, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
                         arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
                         train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        self.distill_rounds, self.device, self.seed = tuple(distill_rounds), device, seed
        self.server_training = server_training or MemoryTraining(model, finetune_config, self.model_cfg, device,
                                                                 seed)
        self.memory = SyntheticMemory(
            image_shape=image_shape, n_classes=n_classes, policy=memory, max_images=max_images_per_client,
            max_bytes=max_bytes_per_client or max_set_bytes(image_shape, n_classes, max_images_per_client),
            pixel_range=pixel_range, screen=create_screen(screen, threshold=screen_threshold), audit=audit)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedAvgDistill: distill in rounds %s, memory=%s, screen=%s, fine-tune %s",
            self.distill_rounds, self.memory.policy, self.memory.screen, self.finetune_config)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages, plus a distillation request to the same nodes in `distill_rounds`."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if server_round in self.distill_rounds:
            messages += distill_requests(messages, self.arrayrecord_key, with_model=False)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the weight updates (FedAvg), store the synthetic sets, fine-tune the average on the memory."""
        replies = list(replies)
        synthetic = [r for r in replies if r.metadata.message_type == DISTILL_MESSAGE]
        updates = [r for r in replies if r.metadata.message_type != DISTILL_MESSAGE]
        self.memory.accept(server_round, admit(server_round, synthetic, self.traffic, distill_reply_problem),
                           self.traffic)
        arrays, metrics = super().aggregate_train(server_round, updates)
        if arrays is not None and len(self.memory) > 0:
            arrays = self.server_training(arrays, self.memory, server_round)
        metrics = MetricRecord({**(metrics or {}), MEMORY_IMAGES: len(self.memory),
                                **self.failure_metrics(server_round)})
        return arrays, metrics
