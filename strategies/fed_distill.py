"""FedDistill: clients upload distilled synthetic sets; the server trains the global model on their pool."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedcl.screen import EmbeddingScreen, create_screen
from fedcl.synthetic import MAX_BYTES
from fedcl.train import TrainConfig
from fedcl.flower.protocol import DISTILL_MESSAGE, MEMORY_IMAGES, SERVER_ROUND
from strategies.memory import SyntheticMemory, train_on_memory
from strategies.traffic import Metered


class FedDistill(Metered, FedAvg):
    """Federated distillation: every round the sampled clients distil their local data into a synthetic set and
    upload it instead of model weights; the server keeps the sets in a pooled memory and trains the global model
    on the pool (DOSFL, FedD3, FedDM).

    With `num_rounds=1` this is one-shot FedDistill: one upload per client, no model ever sent down.  With more
    rounds it is multi-round (FedDM-style): from round 2 the instruction carries the current global model and
    clients distil against it (distribution matching in its perturbed embedding, `fedcl.flower.guided_dm`); the
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
    max_bytes_per_client : int (default: 512 MiB)
        Largest synthetic set accepted from one client (in tensor bytes).
    screen : str (default: "none")
        Poisoning screen of each round's sets before they enter the memory: "none", or "embedding" (per-class mean
        embeddings under seeded random ConvNets against the median over clients, `fedcl.screen`); outliers are
        counted as failures with the screen's reason.
    screen_threshold : float (default: 2.5)
        Score above which the "embedding" screen refuses a set (honest sets score about 1; must be > 0).
    guide_with_global : bool (default: True)
        Send the current global model from round 2 on, so clients distil against it.  False keeps every round
        one-shot style (random networks, no downlink of weights).
    device : str (default: "auto")
        Where the server trains ("auto" = CUDA when present).
    seed : int (default: 0)
        Seed of the server's training (offset by the round).
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, weighted_by_key,
    arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in Flower's `FedAvg`; evaluation (client-side accuracy of the global model) works the same way.
    """

    def __init__(self, *, image_shape: tuple[int, int, int], n_classes: int, model: str = "convnet",
                 model_cfg: dict | None = None, train_config: TrainConfig = TrainConfig(epochs=100),
                 memory: str = "all", max_images_per_client: int = 10_000, max_bytes_per_client: int = MAX_BYTES,
                 screen: str = "none", screen_threshold: float = EmbeddingScreen.threshold,
                 guide_with_global: bool = True, device: str = "auto", seed: int = 0, **fedavg_options) -> None:
        super().__init__(**fedavg_options)
        self.model, self.model_cfg, self.train_config = model, dict(model_cfg or {}), train_config
        self.guide_with_global, self.device, self.seed = guide_with_global, device, seed
        self.memory = SyntheticMemory(image_shape=image_shape, n_classes=n_classes, policy=memory,
                                      max_images=max_images_per_client, max_bytes=max_bytes_per_client,
                                      screen=create_screen(screen, seed=seed, threshold=screen_threshold))
        self._arrays: ArrayRecord | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedDistill: memory=%s, screen=%s, guide_with_global=%s, server training %s",
            self.memory.policy, self.memory.screen, self.guide_with_global, self.train_config)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask the sampled clients for a synthetic set; from round 2 (if guided) send the global model along."""
        self._arrays = arrays
        if self.fraction_train == 0.0:
            return []
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        node_ids, all_nodes = sample_nodes(grid, self.min_available_nodes, sample_size)
        log(INFO, "configure_train: asking %s of %s nodes for synthetic sets", len(node_ids), len(all_nodes))
        config[SERVER_ROUND] = server_round
        content = {self.configrecord_key: config}
        if self.guide_with_global and server_round > 1:
            content[self.arrayrecord_key] = arrays
        return [Message(content=RecordDict(content), message_type=DISTILL_MESSAGE, dst_node_id=node)
                for node in node_ids]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Pool the valid synthetic sets and train the global model on the whole memory."""
        accepted = self.memory.accept(server_round, replies, self.traffic)
        metrics = MetricRecord({"clients-ok": accepted, MEMORY_IMAGES: len(self.memory),
                                **self.failure_metrics(server_round)})
        if len(self.memory) == 0 or self._arrays is None:
            log(INFO, "aggregate_train: no synthetic data yet; the global model is unchanged")
            return None, metrics
        arrays = train_on_memory(self._arrays, self.memory, model=self.model, model_cfg=self.model_cfg,
                                 config=self.train_config, device=self.device, seed=self.seed + server_round)
        return arrays, metrics
