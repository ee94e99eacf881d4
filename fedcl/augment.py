"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021), batched over groups.

DSA draws one random transformation and applies it to both the real and the synthetic batch of a class, so the
matching loss compares like with like, and every operation is differentiable with respect to the synthetic
pixels.  The reference code draws one transformation per class in a Python loop; here a draw holds one
transformation per *group* and `apply(x, draw, groups)` transforms a whole multi-class batch in one pass, each
sample with its group's parameters.  Independent per-sample augmentation (for training on a synthetic set) is the
special case of one group per sample: `dsa(x)`.

Operations (names as in the reference `strategy` string): color (brightness, saturation, contrast), crop
(translation with zero padding), cutout, flip, scale, rotate.  All geometric operations are composed into one
affine matrix and one `grid_sample`; in the reference's default single mode one operation is drawn per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch.nn import functional as F

OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class AugDraw:
    """Per-group parameters of one random draw; identity values for operations a group did not draw."""

    brightness: torch.Tensor  # (G,) added
    saturation: torch.Tensor  # (G,) factor on the deviation from the channel mean
    contrast: torch.Tensor  # (G,) factor on the deviation from the image mean
    theta: torch.Tensor  # (G, 2, 3) affine matrix (crop, flip, scale, rotate composed)
    cutout: torch.Tensor  # (G, 4) box rows/cols as fractions [y0, x0, y1, x1]; empty box = no cutout

    def __len__(self) -> int:
        return int(self.brightness.shape[0])

    def take(self, groups: torch.Tensor) -> AugDraw:
        """Parameters per sample, indexing each field by the sample's group."""
        return AugDraw(*(getattr(self, f.name)[groups] for f in fields(self)))

    def to(self, device: torch.device | str) -> AugDraw:
        return AugDraw(*(getattr(self, f.name).to(device) for f in fields(self)))


class DSA:
    """Differentiable siamese augmentation with the reference hyper-parameters.

    strategy: operations joined by '_' (subset of color, crop, cutout, flip, scale, rotate).
    single:   draw one operation per group (the reference's default 'S' mode); False applies all of them.
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, *, single: bool = True, prob_flip: float = 0.5,
                 ratio_scale: float = 1.2, ratio_rotate: float = 15.0, ratio_crop_pad: float = 0.125,
                 ratio_cutout: float = 0.5, brightness: float = 1.0, saturation: float = 2.0,
                 contrast: float = 0.5) -> None:
        ops = tuple(op for op in strategy.split("_") if op)
        unknown = set(ops) - set(OPERATIONS)
        if not ops or unknown:
            raise ValueError(f"bad DSA strategy {strategy!r}: operations must be among {OPERATIONS}")
        self.ops, self.single = ops, single
        self.prob_flip, self.ratio_scale, self.ratio_rotate = prob_flip, ratio_scale, ratio_rotate
        self.ratio_crop_pad, self.ratio_cutout = ratio_crop_pad, ratio_cutout
        self.ratio_brightness, self.ratio_saturation, self.ratio_contrast = brightness, saturation, contrast

    def __repr__(self) -> str:
        return f"DSA({'_'.join(self.ops)!r}, single={self.single})"

    # ------------------------------------------------------------------ drawing
    def draw(self, n_groups: int, generator: torch.Generator | None = None) -> AugDraw:
        """One random transformation per group (on the CPU; `apply` moves it to the data's device)."""
        g = n_groups

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(g, *shape, generator=generator)

        if self.single:
            choice = torch.randint(len(self.ops), (g,), generator=generator)
            active = {op: choice == i for i, op in enumerate(self.ops)}
        else:
            active = {op: torch.ones(g, dtype=torch.bool) for op in self.ops}
        off = torch.zeros(g, dtype=torch.bool)
        on = {op: active.get(op, off) for op in OPERATIONS}

        ones, zeros = torch.ones(g), torch.zeros(g)
        color = on["color"]
        brightness = torch.where(color, (rand() - 0.5) * self.ratio_brightness, zeros)
        saturation = torch.where(color, rand() * self.ratio_saturation, ones)
        contrast = torch.where(color, rand() + self.ratio_contrast, ones)

        theta = torch.eye(2, 3).repeat(g, 1, 1)
        shift = (rand(2) * 2 - 1) * self.ratio_crop_pad
        theta[:, :, 2] += torch.where(on["crop"].unsqueeze(1), 2 * shift, torch.zeros(g, 2))
        flip = on["flip"] & (rand() < self.prob_flip)
        theta[:, 0, 0] *= torch.where(flip, -ones, ones)
        scale = rand(2) * (self.ratio_scale - 1 / self.ratio_scale) + 1 / self.ratio_scale
        theta[:, :, :2] *= torch.where(on["scale"].unsqueeze(1), scale, torch.ones(g, 2)).unsqueeze(2)
        angle = torch.where(on["rotate"], (rand() - 0.5) * 2 * self.ratio_rotate / 180 * math.pi, zeros)
        rotation = torch.stack([torch.stack([angle.cos(), angle.sin()], 1),
                                torch.stack([-angle.sin(), angle.cos()], 1)], 1)
        theta = torch.cat([rotation @ theta[:, :, :2], rotation @ theta[:, :, 2:]], dim=2)

        centre = rand(2)
        half = self.ratio_cutout / 2
        box = torch.cat([centre - half, centre + half], dim=1)
        box = torch.where(on["cutout"].unsqueeze(1), box, torch.zeros(g, 4))
        return AugDraw(brightness, saturation, contrast, theta, box)

    # ------------------------------------------------------------------ applying
    def apply(self, x: torch.Tensor, draw: AugDraw, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Transform `x` (N, C, H, W), sample i with the draw of group `groups[i]` (default: group i)."""
        params = (draw if groups is None else draw.take(groups.cpu())).to(x.device)
        n = x.shape[0]
        if len(params) != n:
            raise ValueError(f"draw has {len(params)} entries for {n} samples; pass groups=")
        view = (n, 1, 1, 1)
        x = x + params.brightness.to(x.dtype).view(view)
        if x.shape[1] > 1:
            channel_mean = x.mean(dim=1, keepdim=True)
            x = (x - channel_mean) * params.saturation.to(x.dtype).view(view) + channel_mean
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - image_mean) * params.contrast.to(x.dtype).view(view) + image_mean
        grid = F.affine_grid(params.theta.to(x.dtype), list(x.shape), align_corners=True)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return x * self._cutout_mask(params.cutout, x.shape[2], x.shape[3], x.dtype)

    @staticmethod
    def _cutout_mask(box: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        rows = (torch.arange(height, device=box.device, dtype=torch.float32) + 0.5) / height
        cols = (torch.arange(width, device=box.device, dtype=torch.float32) + 0.5) / width
        in_rows = (rows.view(1, -1) >= box[:, 0:1]) & (rows.view(1, -1) < box[:, 2:3])
        in_cols = (cols.view(1, -1) >= box[:, 1:2]) & (cols.view(1, -1) < box[:, 3:4])
        inside = in_rows.unsqueeze(2) & in_cols.unsqueeze(1)
        return (~inside).to(dtype).unsqueeze(1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment every sample with its own independent draw (training on a synthetic set)."""
        return self.apply(x, self.draw(x.shape[0], generator))
