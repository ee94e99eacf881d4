"""Flower integration: SyntheticSet <-> message records, the ClientApp, the ServerApp and `fedcl simulate`.

Importing this package imports Flower; fedcl's core never does.  The apps themselves live in
`fedcl.flower.client_app:app` and `fedcl.flower.server_app:app` (the components `flwr run` loads).
"""

from fedcl.flower.records import (
    META_KEY,
    SYNTHETIC_KEY,
    arrays_to_model,
    model_to_arrays,
    record_nbytes,
    synset_from_record,
    synset_to_record,
)
from fedcl.flower.settings import FedSettings

__all__ = [
    "META_KEY",
    "SYNTHETIC_KEY",
    "FedSettings",
    "arrays_to_model",
    "model_to_arrays",
    "record_nbytes",
    "synset_from_record",
    "synset_to_record",
]
