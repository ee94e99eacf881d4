"""Flower integration: SyntheticSet <-> message records, the ClientApp, the ServerApp and `fedcl simulate`.

Import from the submodules (this package's own import stays light, so the `fedcl` CLI can read settings
without loading Flower or torch):
- `fedcl.flower.records`: SyntheticSet and model <-> Flower records, validated on arrival, byte counts.
- `fedcl.flower.settings`: `FedSettings`, the one table of run settings (run config, messages, CLI).
- `fedcl.flower.client_app:app` and `fedcl.flower.server_app:app`: the components `flwr run` loads.
- `fedcl.flower.simulation`: `simulate(settings, n_clients)` on Flower's simulation engine (Ray).
"""
