"""Distribution matching against the current global model (FedDM-style client distillation).

Plain DM embeds real and synthetic images with a fresh random network every iteration.  In multi-round federated
distillation the clients instead embed with the server's current global model, randomly perturbed around its
weights every iteration (FedDM, Xiong et al. CVPR 2023, samples models from a ball around the global one), so the
synthetic images carry what the global model still gets wrong about the client's data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedcl.distill.dm import DistributionMatching
from fedcl.runtime import generator as make_generator


class GlobalModelDM(DistributionMatching):
    """DM whose embedding network at every iteration is the global model plus relative Gaussian noise.

    global_state: the global model's state_dict (same architecture as `model`/`model_cfg`).
    noise: standard deviation of the perturbation, relative to each parameter tensor's RMS (0 = the exact model).
    All other options are DistributionMatching's.
    """

    name = "dm-global"

    def __init__(self, *, global_state: Mapping[str, torch.Tensor], noise: float = 0.05, **options) -> None:
        super().__init__(**options)
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.global_state = dict(global_state)
        self.noise = noise

    def new_model(self, in_shape: tuple[int, int, int], n_classes: int, seed: int) -> nn.Module:
        net = super().new_model(in_shape, n_classes, seed)
        net.load_state_dict(self.global_state)
        if self.noise > 0:
            gen = make_generator(seed)
            with torch.no_grad():
                for p in net.parameters():
                    rms = p.square().mean().sqrt().clamp_min(1e-8)
                    p.add_(torch.randn(p.shape, generator=gen).to(p.device) * (self.noise * rms))
        return net
