"""Distillers: registry, DM's batched loss equals the per-class reference loop, DM lowers its loss, coresets."""

import pytest
import torch

from fedcl.data import ClassIndex, load_dataset
from fedcl.distill import Source, available_distillers, create_distiller
from fedcl.models import ConvInstanceNorm

SMALL = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_registry_lists_and_validates():
    assert {"dm", "random", "herding"} <= set(available_distillers())
    with pytest.raises(ValueError, match="unknown distiller"):
        create_distiller("magic")
    with pytest.raises(ValueError, match="does not take"):
        create_distiller("random", iterations=5)
    with pytest.raises(ValueError, match="init"):
        create_distiller("dm", init="zeros")


def test_distill_rejects_bad_input(digits):
    dm = create_distiller("dm", iterations=1, model_cfg=SMALL, device="cpu")
    with pytest.raises(ValueError, match="expected images"):
        dm.distill(digits.train_images[:, 0], digits.train_labels, ipc=1)
    with pytest.raises(ValueError, match="ipc"):
        dm.distill(digits.train_images, digits.train_labels, ipc=0)
    with pytest.raises(ValueError, match="labels must lie"):
        dm.distill(digits.train_images, digits.train_labels, ipc=1, n_classes=5)


def _reference_dm_loss(dm, images, labels, syn, syn_labels, seed, net_seed):
    """The reference formulation: one plain conv + GroupNorm network, one forward per class, the class's own draw."""
    gen = torch.Generator().manual_seed(seed)
    index = ClassIndex(labels, 10)
    net = dm.new_model(tuple(images.shape[1:]), 10, net_seed)
    layers = []
    for layer in net.features:
        if isinstance(layer, ConvInstanceNorm):
            norm = torch.nn.GroupNorm(layer.conv.out_channels, layer.conv.out_channels)
            norm.load_state_dict(layer.norm.state_dict())
            layers += [layer.conv, norm]
        else:
            layers.append(layer)
    features = torch.nn.Sequential(*layers)
    picks, classes = index.sample(dm.batch_real, gen)
    draw = dm.augment.draw(10, gen)
    loss = 0.0
    for c in range(10):
        real = dm.augment.apply(images[picks[classes == c]], draw, torch.full((int((classes == c).sum()),), c))
        mine = syn[syn_labels == c]
        fake = dm.augment.apply(mine, draw, torch.full((len(mine),), c))
        loss = loss + ((features(real).flatten(1).mean(0) - features(fake).flatten(1).mean(0)) ** 2).sum()
    return loss


def test_batched_dm_loss_equals_per_class_loop(digits):
    dm = create_distiller("dm", iterations=1, batch_real=32, chunk=50, model_cfg={"width": 32}, device="cpu", amp=False)
    images, labels = digits.train_images, digits.train_labels
    index = ClassIndex(labels, 10)
    syn, syn_labels = dm.initial_images(images, index, 3, torch.Generator().manual_seed(0))
    group_of = torch.arange(10)
    ours = dm.step(images, index, syn, syn_labels, group_of, torch.Generator().manual_seed(11), net_seed=5)
    reference = _reference_dm_loss(dm, images, labels, syn, syn_labels, seed=11, net_seed=5)
    assert torch.allclose(ours, reference, rtol=1e-4), (float(ours), float(reference))


def _fixed_loss(dm, images, labels, synset, seeds=range(8)):
    index = ClassIndex(labels, 10)
    with torch.no_grad():
        return sum(float(dm.step(images, index, synset.images, synset.labels, torch.arange(10),
                                 torch.Generator().manual_seed(s), net_seed=1000 + s)) for s in seeds)


@pytest.mark.parametrize("init", ["noise", "real"])
def test_dm_lowers_its_loss(digits, init):
    images, labels = digits.train_images, digits.train_labels
    options = {"init": init, "batch_real": 48, "model_cfg": SMALL, "device": "cpu", "seed": 1}
    short = create_distiller("dm", iterations=0, **options)
    trained = create_distiller("dm", iterations=60, **options)
    before = _fixed_loss(short, images, labels, short.distill(images, labels, ipc=2, n_classes=10))
    synset = trained.distill(images, labels, ipc=2, n_classes=10, source=Source.of(digits))
    after = _fixed_loss(trained, images, labels, synset)
    assert after < 0.8 * before, (before, after)
    assert len(synset) == 20 and synset.meta.method == "dm" and synset.meta.dataset == "digits"
    assert synset.meta.extra["iterations"] == 60 and synset.meta.extra["final_loss"] is not None


def test_dm_is_reproducible_and_handles_missing_classes(digits):
    keep = digits.train_labels < 4
    images, labels = digits.train_images[keep], digits.train_labels[keep]
    a = create_distiller("dm", iterations=3, model_cfg=SMALL, device="cpu", seed=2).distill(images, labels, ipc=2,
                                                                                          n_classes=10)
    b = create_distiller("dm", iterations=3, model_cfg=SMALL, device="cpu", seed=2).distill(images, labels, ipc=2,
                                                                                          n_classes=10)
    assert torch.equal(a.images, b.images)
    assert a.classes() == [0, 1, 2, 3] and a.meta.n_classes == 10


def test_random_coreset_picks_real_images_per_class(digits):
    synset = create_distiller("random", seed=0).distill(digits.train_images, digits.train_labels, ipc=3)
    assert torch.bincount(synset.labels).tolist() == [3] * 10
    flat = digits.train_images.flatten(1)
    for image, label in zip(synset.images, synset.labels):
        match = (flat == image.flatten()).all(dim=1).nonzero().flatten()
        assert len(match) >= 1 and int(digits.train_labels[match[0]]) == int(label)


def test_herding_mean_is_closer_than_random(digits):
    images, labels = digits.train_images, digits.train_labels
    herding = create_distiller("herding", features="pixels").distill(images, labels, ipc=5)
    random = create_distiller("random", seed=0).distill(images, labels, ipc=5)

    def gap(synset):
        return sum(float((images[labels == c].mean(0) - synset.images[synset.labels == c].mean(0)).norm())
                   for c in range(10))

    assert gap(herding) < 0.7 * gap(random)
    by_model = create_distiller("herding", model_cfg=SMALL, device="cpu").distill(images, labels, ipc=2)
    assert torch.bincount(by_model.labels).tolist() == [2] * 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dm_on_cuda_with_amp(digits):
    dm = create_distiller("dm", iterations=5, model_cfg=SMALL, device="cuda", amp=True)
    synset = dm.distill(digits.train_images, digits.train_labels, ipc=2)
    assert synset.images.device.type == "cpu" and torch.isfinite(synset.images).all()


def test_only_a_known_source_projects_the_images_into_its_pixel_range(digits):
    from fedcl.distill import Source, create_distiller

    images, labels = digits.train_images[:200], digits.train_labels[:200]
    made = {}
    for name, source in (("known", Source.of(digits)), ("unnamed", Source()), ("none", None)):
        dm = create_distiller("dm", iterations=1, init="noise", batch_real=8, model_cfg={"width": 4}, seed=0)
        made[name] = dm.distill(images, labels, ipc=2, n_classes=10, source=source).images
    mean, std = digits.mean[0], digits.std[0]
    assert made["known"].min() >= -mean / std - 1e-6 and made["known"].max() <= (1 - mean) / std + 1e-6
    assert torch.equal(made["unnamed"], made["none"])
    assert made["none"].min() < -mean / std or made["none"].max() > (1 - mean) / std  # noise, left as made
