"""Flower integration: SyntheticSet <-> message records, the ClientApp, the ServerApp and `fedcl simulate`.

Import from the submodules (this package's own import stays light, so the `fedcl` CLI can read settings
without loading Flower or torch):
- `fedcl.flower.records`: SyntheticSet and model <-> Flower records, validated on arrival, byte counts.
- `fedcl.flower.settings`: `FedSettings`, the one table of run settings (run config, messages, CLI).
- `fedcl.flower.client_app:app` and `fedcl.flower.server_app:app`: the components `flwr run` loads.
- `fedcl.flower.simulation`: `simulate(settings, n_clients)` on Flower's simulation engine (Ray) or in-process
  (`fedcl.flower.local_grid.LocalGrid`, the clients one after another).
- `fedcl.flower.continual_client` / `continual_server`: federated continual learning (`scenario="continual"`): task
  streams per client, replay memories kept in `Context.state` and on disk, tasks.csv with average accuracy,
  forgetting, backward transfer and bytes; `fedcl.flower.comparison` runs the strategy comparison (`fedcl demo`).
"""
