"""fedcl: continual and federated learning whose memory is distilled data.

The core (`synthetic`, `data`, `models`, `augment`, `distill`, `train`) never imports Flower or Avalanche;
their adapters live in `fedcl.flower`, `fedcl.avalanche` and the top-level `strategies` package.
"""

__version__ = "0.1.0"
