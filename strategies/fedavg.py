"""FedAvg and Flower's robust aggregators with the same traffic accounting and reply boundary as the distillation
strategies (the baselines)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from strategies.metered import Metered


class MeteredFedAvg(Metered, FedAvg):
    """Flower's `FedAvg`, unchanged, plus `self.traffic` (uplink/downlink bytes and failures per round) and the
    reply boundary of `Metered`.

    Parameters
    ----------
    max_examples : int
        As in `Metered`: the most examples one reply may weigh.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes, weighted_by_key,
    arrayrecord_key, configrecord_key, train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in Flower's `FedAvg`, with the same defaults.
    """


class MeteredFedMedian(Metered, FedMedian):
    """Flower's `FedMedian` (coordinate-wise median of the updates) with `Metered`'s accounting and boundary.
    Parameters as in `MeteredFedAvg`."""


class MeteredFedTrimmedAvg(Metered, FedTrimmedAvg):
    """Flower's `FedTrimmedAvg` (coordinate-wise mean after cutting the `beta` fraction at each end) with
    `Metered`'s accounting and boundary.  Parameters as in `MeteredFedAvg`, plus Flower's `beta` (default 0.2)."""


class MeteredKrum(Metered, Krum):
    """Flower's `Krum` (the update closest to its neighbours) with `Metered`'s accounting and boundary.
    Parameters as in `MeteredFedAvg`, plus Flower's `num_malicious_nodes` (default 0)."""


#: `FedSettings.aggregation` -> the strategy that aggregates weight rounds that way.
AGGREGATORS: dict[str, type[Metered]] = {"mean": MeteredFedAvg, "median": MeteredFedMedian,
                                         "trimmed": MeteredFedTrimmedAvg, "krum": MeteredKrum}
