"""FedAvg with the same traffic and failure accounting as the distillation strategies (the baseline)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.traffic import Metered


class MeteredFedAvg(Metered, FedAvg):
    """Flower's `FedAvg`, unchanged, plus `self.traffic`: uplink/downlink bytes and failures per round.

    Parameters
    ----------
    All of Flower's `FedAvg` (fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
    min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
    evaluate_metrics_aggr_fn), with the same defaults.
    """
