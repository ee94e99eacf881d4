"""Networks used to distil and to evaluate: ConvNet (the distillation papers' backbone), MLP, LeNet.

Every model exposes `embed(x)` (the features before the classifier, which distribution matching compares) and
`forward(x) = classifier(embed(x))`.  Build them by name with `create_model(name, in_shape, n_classes, **cfg)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


class InstanceNorm(nn.Module):
    """Instance normalisation with a per-channel affine: the same function as `nn.GroupNorm(C, C)`.

    The distillation papers' ConvNet uses GroupNorm(C, C).  On CPU with channels_last tensors PyTorch's
    GroupNorm (and `var_mean` over H, W) is several times slower than two plain means; so the statistics come
    from E[x] and E[x^2], and normalisation and affine are folded into one multiply-add.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = (x.square().mean(dim=(2, 3), keepdim=True) - mean.square()).clamp_min(0)
        scale = self.weight.view(1, -1, 1, 1) * torch.rsqrt(var + self.eps)
        return torch.addcmul(self.bias.view(1, -1, 1, 1) - mean * scale, x, scale)


class ConvInstanceNorm(nn.Module):
    """`norm(conv(x))` for a stride-1 convolution followed by InstanceNorm, computed exactly but faster when the
    convolution has few inputs per output (the first layer: 1 or 3 channels x 3x3).

    Instance-norm statistics of a convolution's output are linear/quadratic in the statistics of its input
    patches: per image, with patch mean mu and covariance S, channel o has mean w_o.mu + b_o and variance
    w_o' S w_o.  So the normalisation and the affine fold into per-image weights, and one batched matrix product
    writes the normalised activations straight into channels_last memory - instead of a convolution plus two
    passes over the largest activation tensor of the network.  Larger convolutions take the plain path.
    """

    MAX_PATCH = 64

    def __init__(self, conv: nn.Conv2d, norm: InstanceNorm) -> None:
        super().__init__()
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or isinstance(conv.padding, str):
            raise ValueError("ConvInstanceNorm needs a stride-1, dilation-1, ungrouped convolution")
        self.conv, self.norm = conv, norm
        self.fused = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= self.MAX_PATCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.norm(self.conv(x))
        n, _, height, width = x.shape
        (kh, kw), (ph, pw) = self.conv.kernel_size, self.conv.padding
        out_h, out_w = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
        # Patches as strided views of the padded input, copied once into (n, K, L); F.unfold (im2col) is the
        # same result but erratically slow on CPU.
        windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, 1).unfold(3, kw, 1)  # (n, C, out_h, out_w, kh, kw)
        patches = windows.permute(0, 1, 4, 5, 2, 3).reshape(n, -1, out_h * out_w)  # (n, K, L)
        mean = patches.mean(dim=2)  # (n, K)
        second = torch.bmm(patches, patches.transpose(1, 2)) / patches.shape[2]  # (n, K, K)
        cov = second - mean.unsqueeze(2) * mean.unsqueeze(1)
        weight = self.conv.weight.flatten(1).t()  # (K, O)
        var = (torch.matmul(cov, weight) * weight).sum(dim=1).clamp_min(0)  # (n, O)
        scale = self.norm.weight * torch.rsqrt(var + self.norm.eps)  # (n, O)
        shift = self.norm.bias - scale * (mean @ weight)  # conv bias cancels under normalisation
        # A constant-1 row in the patches carries the shift, so one bmm writes the output (no bias broadcast copy).
        patches = torch.cat([patches, patches.new_ones(n, 1, patches.shape[2])], dim=1)
        folded = torch.cat([weight * scale.unsqueeze(1), shift.unsqueeze(1)], dim=1)  # (n, K + 1, O)
        out = torch.bmm(patches.transpose(1, 2), folded)  # (n, L, O): channels_last memory
        return out.view(n, out_h, out_w, -1).permute(0, 3, 1, 2)


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instancenorm":
        return InstanceNorm(channels)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.GroupNorm(1, channels)
    if norm == "groupnorm":
        return nn.GroupNorm(min(4, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose instancenorm, batchnorm, layernorm, groupnorm or none")


def _activation(name: str) -> nn.Module:
    table: dict[str, Callable[[], nn.Module]] = {"relu": lambda: nn.ReLU(inplace=True),
                                                 "leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=True),
                                                 "sigmoid": nn.Sigmoid}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


def _pool(name: str) -> nn.Module:
    if name == "avgpool":
        return nn.AvgPool2d(2, 2)
    if name == "maxpool":
        return nn.MaxPool2d(2, 2)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling {name!r}; choose avgpool, maxpool or none")


class ConvNet(nn.Module):
    """depth x [conv3x3(width), norm, activation, pool2] then a linear classifier.

    As in the DC/DSA/DM/MTT papers: instance norm and average pooling by default; the first convolution pads
    the input up to a multiple of 2**depth (28x28 -> 32x32 with padding 3, as the reference code does).
    """

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, *, width: int = 128, depth: int = 3,
                 norm: str = "instancenorm", activation: str = "relu", pooling: str = "avgpool") -> None:
        super().__init__()
        channels, height, width_px = in_shape
        stride = 2**depth if pooling != "none" else 1
        padded = max(math.ceil(height / stride) * stride, stride)
        first_pad = 1 + (padded - height) // 2
        layers: list[nn.Module] = []
        size = (height + 2 * first_pad - 2, width_px + 2 * first_pad - 2)
        for d in range(depth):
            conv = nn.Conv2d(channels if d == 0 else width, width, 3, padding=first_pad if d == 0 else 1)
            norm_layer = _norm_layer(norm, width)
            if d == 0 and isinstance(norm_layer, InstanceNorm):
                layers.append(ConvInstanceNorm(conv, norm_layer))
            else:
                layers += [conv, norm_layer]
            layers.append(_activation(activation))
            layers.append(_pool(pooling))
            if pooling != "none":
                size = (size[0] // 2, size[1] // 2)
        if min(size) < 1:
            raise ValueError(f"input {in_shape} is too small for depth {depth}")
        self.features = nn.Sequential(*layers)
        self.embed_dim = width * size[0] * size[1]
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    """depth-1 hidden layers of `width` units with ReLU, then a linear classifier."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, *, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        dims = [math.prod(in_shape)] + [width] * max(depth - 1, 1)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.embed_dim = dims[-1]
        self.classifier = nn.Linear(self.embed_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class LeNet(nn.Module):
    """LeNet-5 style: two conv(5x5)+pool stages and two hidden linear layers (inputs padded to at least 28x28)."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int) -> None:
        super().__init__()
        channels, height, width = in_shape
        pad = 2 if min(height, width) < 32 else 0
        size = ((height + 2 * pad - 4) // 2 - 4) // 2, ((width + 2 * pad - 4) // 2 - 4) // 2
        if min(size) < 1:
            pad += math.ceil((16 - min(height, width) - 2 * pad) / 2)
            size = ((height + 2 * pad - 4) // 2 - 4) // 2, ((width + 2 * pad - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * size[0] * size[1], 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        )
        self.embed_dim = 84
        self.classifier = nn.Linear(84, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


_MODELS: dict[str, Callable[..., nn.Module]] = {"convnet": ConvNet, "mlp": MLP, "lenet": LeNet}


def available_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, in_shape: tuple[int, int, int], n_classes: int, **cfg: object) -> nn.Module:
    """Build a freshly initialised model by name: `convnet` (width, depth, norm, activation, pooling), `mlp`
    (width, depth) or `lenet`.  Unknown names or options raise ValueError naming the choices."""
    key = name.lower()
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {available_models()}")
    try:
        return _MODELS[key](tuple(in_shape), n_classes, **cfg)
    except TypeError as err:
        raise ValueError(f"bad options for model {name!r}: {err}") from None
