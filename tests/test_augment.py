"""Differentiable siamese augmentation: shared draws per group, identity where not drawn, gradients flow."""

import torch

from fedcl.augment import DSA


def test_same_group_same_transform_and_groups_differ():
    dsa = DSA(single=False)
    x = torch.randn(1, 1, 16, 16).repeat(4, 1, 1, 1)
    draw = dsa.draw(2, torch.Generator().manual_seed(0))
    out = dsa.apply(x, draw, torch.tensor([0, 1, 0, 1]))
    assert torch.allclose(out[0], out[2]) and torch.allclose(out[1], out[3])
    assert not torch.allclose(out[0], out[1])


def test_real_and_synthetic_batches_share_each_class_draw():
    dsa = DSA()
    real, syn = torch.randn(6, 3, 12, 12), torch.randn(3, 3, 12, 12)
    syn[1] = real[4]
    draw = dsa.draw(3, torch.Generator().manual_seed(3))
    real_out = dsa.apply(real, draw, torch.tensor([0, 0, 1, 1, 1, 2]))
    syn_out = dsa.apply(syn, draw, torch.tensor([0, 1, 2]))
    assert torch.allclose(real_out[4], syn_out[1], atol=1e-6)


def test_each_operation_alone():
    x = torch.randn(8, 1, 10, 10)
    gen = torch.Generator().manual_seed(1)
    flipped = DSA("flip", prob_flip=1.0)(x, gen)
    assert torch.allclose(flipped, x.flip(3), atol=1e-5)
    cut = DSA("cutout")(x, gen)
    zeroed = (cut == 0).flatten(1).float().mean(1)
    assert torch.all((zeroed > 0.1) & (zeroed < 0.5))
    for op in ("color", "crop", "scale", "rotate"):
        out = DSA(op)(x, gen)
        assert out.shape == x.shape and torch.isfinite(out).all() and not torch.allclose(out, x)


def test_draws_are_reproducible_and_differentiable():
    dsa = DSA()
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    a = dsa(x, torch.Generator().manual_seed(5))
    b = dsa(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_strategy_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="strategy"):
        DSA("color_blur")
