"""The functional building blocks of DC/DSA, MTT and DD: flat parameters, per-class gradients, unrolled SGD."""

import torch
from torch.nn import functional as F

from fedcl.distill.dc import gradient_distance, loops_for
from fedcl.distill.functional import FlatParams, per_class_gradients, unrolled_sgd
from fedcl.models import create_model


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", (1, 8, 8), 10, width=8)


def test_per_class_gradients_equal_a_per_class_loop():
    net = _net()
    params = {name: p.detach() for name, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 6, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (4, 6), generator=gen)
    batched = per_class_gradients(net, params, images, labels)
    for c in range(4):
        loss = F.cross_entropy(net(images[c]), labels[c])
        grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
        for (name, p), g in zip(net.named_parameters(), grads):
            expected = torch.zeros_like(p) if g is None else g
            torch.testing.assert_close(batched[name][c], expected, rtol=1e-4, atol=1e-6)


def test_per_class_gradients_are_differentiable_in_the_images():
    net = _net()
    params = {name: p.detach() for name, p in net.named_parameters()}
    images = torch.randn(3, 2, 1, 8, 8, requires_grad=True)
    labels = torch.arange(3).repeat_interleave(2).view(3, 2)
    with torch.no_grad():
        real = per_class_gradients(net, params, torch.randn(3, 5, 1, 8, 8), labels[:, :1].expand(3, 5))
    loss = gradient_distance(real, per_class_gradients(net, params, images, labels))
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert 0 < float(loss.detach()) < 2 * 3 * (8 + 8 + 8 + 10)


def test_unrolled_sgd_matches_plain_autograd_through_the_steps():
    net = _net()
    flat = FlatParams(net)
    p0 = flat.flatten().requires_grad_(True)
    images = torch.randn(10, 1, 8, 8, requires_grad=True)
    logits = torch.randn(10, 10, requires_grad=True)
    lrs = torch.tensor([0.05, 0.1, 0.02, 0.07], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(10, generator=gen)[:6] for _ in range(4)]

    def step(k, p, x, y):
        return F.cross_entropy(flat(p, x), y)

    def grads_of(final):
        return torch.autograd.grad((final ** 2).sum(), [p0, images, logits, lrs])

    ours = grads_of(unrolled_sgd(step, batches, p0, images, logits.softmax(1), lrs))
    p = p0
    for k, batch in enumerate(batches):
        (g,) = torch.autograd.grad(step(k, p, images[batch], logits.softmax(1)[batch]), p, create_graph=True)
        p = p - lrs[k] * g
    for a, b in zip(ours, grads_of(p)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_flat_params_round_trip_and_functional_forward():
    net, other = _net(0), _net(1)
    flat = FlatParams(net)
    x = torch.randn(3, 1, 8, 8)
    vector = flat.flatten(other)
    torch.testing.assert_close(flat(vector, x), other(x))
    flat.load(vector)
    torch.testing.assert_close(net(x), other(x))


def test_dc_loop_schedule_follows_the_paper():
    assert loops_for(1) == (1, 1) and loops_for(10) == (10, 50) and loops_for(50) == (50, 10)
