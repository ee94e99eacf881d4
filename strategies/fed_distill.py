"""FedDistill: clients upload distilled synthetic sets; the server trains the global model on their pool."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl.flower.protocol import (
    DISTILL_MESSAGE,
    MAX_COUNT,
    MEMORY_IMAGES,
    META_KEY,
    METRICS,
    NUM_EXAMPLES,
    SYNTHETIC_IMAGES,
    SYNTHETIC_KEY,
)
from fedcl.flower.records import max_set_bytes
from fedcl.screen import EmbeddingScreen, create_screen
from fedcl.synthetic import SyntheticSet
from fedcl.train import TrainConfig
from strategies.boundary import admit, metric_problem, record_problem
from strategies.memory import MemoryTraining, ServerTraining, SyntheticMemory
from strategies.metered import Metered, MetricsAggregation


class FedDistill(Metered, FedAvg):
    """Federated distillation: every round the sampled clients distil their local data into a synthetic set and
    upload it instead of model weights; the server keeps the sets in a pooled memory and trains the global model
    on the pool (DOSFL, FedD3, FedDM).

    With `num_rounds=1` this is one-shot FedDistill: one upload per client, no model ever sent down.  With more
    rounds it is multi-round (FedDM-style): from round 2 the instruction carries the current global model and
    clients distil against it (DM's `guide`: matching in its perturbed embedding, `fedcl.distill.dm`); the
    server continues training the global model on the growing memory.  Failed, silent or malformed clients are
    counted in `self.traffic` with a reason and the round completes with the others.

    Parameters
    ----------
    image_shape : tuple[int, int, int]
        (C, H, W) every synthetic image must have.
    n_classes : int
        Number of classes; labels outside 0..n_classes-1 are rejected.
    model : str (default: "convnet")
        `fedcl.models.create_model` name of the global model.
    model_cfg : dict | None (default: None)
        Options of that model (e.g. {"width": 32}).
    train_config : TrainConfig (default: TrainConfig(epochs=100))
        How the server trains the global model on the pooled memory each round (epochs, lr, DSA, ...).
    memory : str (default: "all")
        "all": keep every set ever received; "latest": keep only each client's most recent set.
    max_images_per_client : int (default: 10_000)
        Largest synthetic set accepted from one client (in images); larger ones are rejected as oversize.
    max_bytes_per_client : int | None (default: None)
        Largest reply accepted from one client (tensor bytes plus metadata), checked before anything is decoded;
        None derives it from the expected size, `fedcl.flower.records.max_set_bytes` of `max_images_per_client`.
    pixel_range : tuple[float, float] | None (default: None)
        Lowest and highest pixel value a synthetic image may hold (`fedcl.flower.records.pixel_window` of the
        dataset: its normalised range plus a margin); None accepts any finite value.
    screen : str (default: "none")
        Poisoning screen of each round's sets before they enter the memory: "none", or "embedding" (per-class mean
        embeddings under random ConvNets seeded from server-side secret randomness, against the median over
        clients, `fedcl.screen`); outliers are counted as failures with the screen's reason.
    screen_threshold : float (default: 2.5)
        Score above which the "embedding" screen refuses a set (honest sets score about 1; must be > 0).
    guide_with_global : bool (default: True)
        Send the current global model from round 2 on, so clients distil against it.  False keeps every round
        one-shot style (random networks, no downlink of weights).
    device : str (default: "auto")
        Where the server trains ("auto" = CUDA when present).
    seed : int (default: 0)
        Seed of the server's training (offset by the round).
    audit : Callable[[SyntheticSet], int] | None (default: None)
        Counts the near-copies of training images in an uploaded set (`fedcl.audit.Auditor.near_copies`, for a
        server that holds the training split, as in simulations); the counts by round are `memory.near_copies`.
    server_training : ServerTraining | None (default: None)
        How the server trains on its pooled memory: a callable (arrays, memory, server round) -> arrays, e.g. a
        user's own trainer; None trains the global model with `MemoryTraining`
        (model, model_cfg, train_config, device, seed).
    max_examples : int
        As in `strategies.metered.Metered`: the most examples one reply may weigh (larger claims are clipped).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, weighted_by_key,
    arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in Flower's `FedAvg`, with its defaults (1.0, 1.0, 2, 2, 2, "num-examples", "arrays", "config", None,
        None), and passed to it: an unknown keyword is a TypeError.  Evaluation (client-side accuracy of the
        global model) works as in FedAvg.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], n_classes: int, model: str = "convnet",
                 model_cfg: dict | None = None, train_config: TrainConfig = TrainConfig(epochs=100),
                 memory: str = "all", max_images_per_client: int = 10_000, max_bytes_per_client: int | None = None,
                 pixel_range: tuple[float, float] | None = None, screen: str = "none",
                 screen_threshold: float = EmbeddingScreen.threshold, guide_with_global: bool = True,
                 device: str = "auto", seed: int = 0, audit: Callable[[SyntheticSet], int] | None = None,
                 server_training: ServerTraining | None = None,
                 max_examples: int = MAX_COUNT,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: MetricsAggregation | None = None,
                 evaluate_metrics_aggr_fn: MetricsAggregation | None = None) -> None:
        self.model, self.model_cfg, self.train_config = model, dict(model_cfg or {}), train_config
        super().__init__(max_examples=max_examples, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
                         arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
                         train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        self.guide_with_global, self.device, self.seed = guide_with_global, device, seed
        self.server_training = server_training or MemoryTraining(model, train_config, self.model_cfg, device, seed)
        self.memory = SyntheticMemory(
            image_shape=image_shape, n_classes=n_classes, policy=memory, max_images=max_images_per_client,
            max_bytes=max_bytes_per_client or max_set_bytes(image_shape, n_classes, max_images_per_client),
            pixel_range=pixel_range, screen=create_screen(screen, threshold=screen_threshold), audit=audit)

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedDistill: memory=%s, screen=%s, guide_with_global=%s, server training %s",
            self.memory.policy, self.memory.screen, self.guide_with_global, self.train_config)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampled train messages as requests for a synthetic set; from round 2 (if guided) they carry the
        global model along."""
        messages = super().configure_train(server_round, arrays, config, grid)
        return distill_requests(messages, self.arrayrecord_key, self.guide_with_global and server_round > 1)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Pool the valid synthetic sets and train the global model on the whole memory."""
        accepted = self.memory.accept(server_round, admit(server_round, replies, self.traffic, distill_reply_problem),
                                      self.traffic)
        metrics = MetricRecord({"clients-ok": accepted, MEMORY_IMAGES: len(self.memory),
                                **self.failure_metrics(server_round)})
        if len(self.memory) == 0 or self.sent_arrays is None:
            log(INFO, "aggregate_train: no synthetic data yet; the global model is unchanged")
            return None, metrics
        arrays = self.server_training(self.sent_arrays, self.memory, server_round)
        return arrays, metrics


def distill_requests(messages: Iterable[Message], arrayrecord_key: str, with_model: bool) -> list[Message]:
    """FedAvg's train messages turned into distillation requests to the same nodes, carrying the global model
    (ArrayRecord `arrayrecord_key`) only when `with_model`."""
    requests = []
    for message in messages:
        content = RecordDict({k: v for k, v in message.content.items() if with_model or k != arrayrecord_key})
        requests.append(Message(content=content, message_type=DISTILL_MESSAGE,
                                dst_node_id=message.metadata.dst_node_id))
    return requests


def distill_reply_problem(reply: Message, optional_arrays: frozenset[str] = frozenset()) -> str | None:
    """Why a reply to a distillation request breaks the protocol, or None: it must hold a synthetic set (its
    ArrayRecord and metadata) or none, optionally the ArrayRecords named in `optional_arrays`, and one
    MetricRecord of protocol metrics in range."""
    content = reply.content
    has_set = SYNTHETIC_KEY in content.array_records
    arrays = ({SYNTHETIC_KEY} if has_set else set()) | (optional_arrays & set(content.array_records))
    return record_problem(content, arrays=arrays, configs={META_KEY} if has_set else (), metrics={METRICS}) \
        or metric_problem(content.metric_records[METRICS], required=(NUM_EXAMPLES, SYNTHETIC_IMAGES),
                          known_only=True)
