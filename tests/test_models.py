"""Models: shapes, the distillation ConvNet's padding rule, the fast instance norm equals GroupNorm."""

import pytest
import torch

from fedcl.models import ConvInstanceNorm, ConvNet, InstanceNorm, create_model


@pytest.mark.parametrize("name", ["convnet", "mlp", "lenet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_build_and_run(name, shape):
    net = create_model(name, shape, 10, **({"width": 16} if name != "lenet" else {}))
    x = torch.randn(4, *shape)
    assert net(x).shape == (4, 10)
    assert net.embed(x).shape == (4, net.embed_dim)


def test_convnet_matches_reference_geometry():
    net = ConvNet((1, 28, 28), 10)  # the papers: 28x28 padded to 32x32 by the first conv, 128 x 4 x 4 features
    assert net.embed_dim == 128 * 4 * 4
    assert ConvNet((3, 32, 32), 10).embed_dim == 2048
    for norm in ("batchnorm", "layernorm", "groupnorm", "none"):
        assert ConvNet((1, 28, 28), 10, width=8, norm=norm)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert ConvNet((1, 28, 28), 10, width=8, pooling="maxpool").embed_dim == 8 * 16


def test_instance_norm_equals_group_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    ours, ref = InstanceNorm(16), torch.nn.GroupNorm(16, 16)
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())
    assert torch.allclose(ours(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("channels,padding,size", [(1, 3, 28), (3, 1, 32), (1, 1, 8)])
def test_fused_first_layer_equals_conv_then_group_norm(channels, padding, size):
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(channels, 32, 3, padding=padding), InstanceNorm(32)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    ref_norm = torch.nn.GroupNorm(32, 32)
    ref_norm.load_state_dict(norm.state_dict())
    fused = ConvInstanceNorm(conv, norm)
    assert fused.fused
    x = torch.randn(5, channels, size, size, requires_grad=True)
    ours, ref = fused(x), ref_norm(conv(x))
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(ours, ref, atol=1e-4)
    probe = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * probe).sum(), [x, conv.weight, norm.weight, norm.bias])
    g_ref = torch.autograd.grad((ref * probe).sum(), [x, conv.weight, ref_norm.weight, ref_norm.bias])
    for a, b in zip(g_ours, g_ref):  # weight gradients sum thousands of products: compare whole tensors
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_create_model_errors_name_the_choices():
    with pytest.raises(ValueError, match="convnet"):
        create_model("resnet999", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="bad options"):
        create_model("convnet", (1, 8, 8), 10, colour="red")
    with pytest.raises(ValueError, match="norm"):
        create_model("convnet", (1, 8, 8), 10, norm="magic")
