"""DC, DSA, DD and MTT on digits with small networks: each lowers its own loss; DD's and MTT's extras work."""

import pytest
import torch

from fedcl.data import load_dataset
from fedcl.distill import ExpertBuffer, Source, create_distiller
from fedcl.distill.functional import FlatParams, unfused, unrolled_sgd
from fedcl.models import create_model
from fedcl.runtime import seeded
from fedcl.synthetic import SyntheticSet
from fedcl.train import evaluate_synthetic, train_with_learned_lrs

SMALL = {"model_cfg": {"width": 8}, "seed": 0}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _distill(name, data, ipc=1, **options):
    distiller = create_distiller(name, **{**SMALL, **options})
    synset = distiller.distill(data.train_images, data.train_labels, ipc=ipc, n_classes=data.n_classes,
                               source=Source.of(data))
    return distiller, synset


def _loss_trace(name, data, **options):
    losses = []
    distiller = create_distiller(name, **{**SMALL, **options})
    synset = distiller.distill(data.train_images, data.train_labels, ipc=1, n_classes=data.n_classes,
                               callback=lambda it, loss: losses.append(loss))
    return losses, synset


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_gradient_matching_lowers_its_loss(digits, name):
    """Paired against the same run with frozen images (lr 0): same networks, real batches and augmentation draws
    at every iteration, so the comparison is free of the noise of drawing a new network per iteration.

    ConvNet depth 2 on 8x8 digits: at depth 3 the last block instance-normalises 2x2 maps and the matching loss
    is so rough that image steps of lr 0.01 or 0.1 raised it on fresh networks (DSA's even at 1e-3)."""
    options = {"iterations": 24, "batch_real": 32, "model_cfg": {"width": 16, "depth": 2}}  # paper's lr_img 0.1
    frozen, _ = _loss_trace(name, digits, lr_img=0.0, **options)
    moved, synset = _loss_trace(name, digits, **options)
    assert moved[0] == pytest.approx(frozen[0])  # the same first network, batch and draw
    later = range(8, 24)
    assert sum(moved[i] < frozen[i] for i in later) >= 14
    assert sum(moved[i] for i in later) < 0.8 * sum(frozen[i] for i in later)
    assert synset.meta.extra["dsa"] is (name == "dsa")


def test_dd_fixed_init_lowers_its_loss_and_beats_chance_from_its_known_init(digits):
    distiller = create_distiller("dd", model_cfg={"width": 32}, seed=0, iterations=30)
    synset = distiller.distill(digits.train_images, digits.train_labels, ipc=1, n_classes=10)
    extra = synset.meta.extra
    assert extra["model"] == "mlp"  # DD's default network
    assert extra["final_loss"] < 0.8 * extra["first_loss"]
    assert synset.lrs is not None and synset.lrs.shape == (10,) and bool((synset.lrs > 0).all())
    assert extra["init_mode"] == "fixed" and extra["init_seed"] == 0
    result = evaluate_synthetic(synset, digits, model="convnet", n_models=2)  # the set's own network is used
    assert result.model == "mlp" and result.mean > 0.5  # chance is 0.1
    assert result.accuracies[0] == result.accuracies[1]  # both start from the one known initialisation


@pytest.mark.parametrize("model, cfg", [("convnet", {"width": 8}), ("mlp", {"width": 16}), ("lenet", {})])
def test_replaying_learned_lrs_retraces_the_distillers_unroll(digits, model, cfg):
    """Evaluation must rebuild the known initialisation and take exactly the steps the distiller unrolled
    (same network, norm path, order, full batch, dtype): the final parameters agree."""
    distiller, synset = _distill("dd", digits, iterations=2, steps=4, model=model, model_cfg=cfg)
    flat = FlatParams(unfused(distiller.new_model(digits.image_shape, 10, synset.meta.extra["init_seed"])))
    steps = [torch.arange(len(synset))] * 4

    def step_loss(k, p, x, y):
        return torch.nn.functional.cross_entropy(flat(p, x), y)

    unrolled = unrolled_sgd(step_loss, steps, flat.flatten(), synset.images, synset.labels, synset.lrs)
    with seeded(synset.meta.extra["init_seed"]):
        net = create_model(model, digits.image_shape, 10, **cfg)
    train_with_learned_lrs(net, synset.images, synset.labels, synset.lrs, device="cpu")
    torch.testing.assert_close(flat.flatten(net), unrolled, rtol=1e-4, atol=1e-5)


def test_dd_set_from_a_file_trains_from_its_known_init(digits, tmp_path):
    """A saved and reloaded fixed-init DD set rebuilds the initialisation it was distilled for and retraces the
    in-memory set's training exactly; its learned steps lower the loss from there, and another init does not
    start where the known one does."""
    distiller, synset = _distill("dd", digits, iterations=3, steps=4)
    loaded = SyntheticSet.load(synset.save(tmp_path / "dd.safetensors"))
    torch.testing.assert_close(loaded.lrs, synset.lrs)
    fresh = create_distiller("dd", **SMALL)

    reference = distiller.new_model(digits.image_shape, 10, synset.meta.extra["init_seed"])
    expected = train_with_learned_lrs(reference, synset.images, synset.labels, synset.lrs, device="cpu")
    net = fresh.new_model(digits.image_shape, 10, loaded.meta.extra["init_seed"])
    losses = train_with_learned_lrs(net, loaded.images, loaded.labels, loaded.lrs, device="cpu")
    assert len(losses) == 4 and losses == pytest.approx(expected, rel=1e-6)
    for trained, ref in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, ref)
    assert losses[-1] < losses[0]
    other = fresh.new_model(digits.image_shape, 10, loaded.meta.extra["init_seed"] + 1)
    assert train_with_learned_lrs(other, loaded.images, loaded.labels, loaded.lrs, device="cpu")[0] != losses[0]


def test_dd_random_init_and_learned_labels(digits):
    _, synset = _distill("dd", digits, iterations=4, steps=3, init_mode="random", learn_labels=True)
    assert synset.soft_labels and synset.labels.dtype == torch.float32
    torch.testing.assert_close(synset.labels.sum(dim=1), torch.ones(10))
    assert synset.meta.extra["init_seed"] is None
    result = evaluate_synthetic(synset, digits, model_cfg={"width": 8}, n_models=2)
    assert result.model == "mlp"  # the network the set records (DD's MLP)
    assert len(result.accuracies) == 2 and result.mean == pytest.approx(sum(result.accuracies) / 2)
    assert result.accuracies[0] != result.accuracies[1]  # random init: each network starts from its own draw


def test_mtt_lowers_its_loss_and_reuses_saved_experts(digits, tmp_path):
    options = {"iterations": 15, "syn_steps": 4, "n_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 1,
               "expert_epochs": 1, "dsa": False, "lr_img": 10.0, "experts": str(tmp_path / "experts")}
    distiller, synset = _distill("mtt", digits, **options)
    extra = synset.meta.extra
    assert extra["final_loss"] < extra["first_loss"]
    assert (tmp_path / "experts" / "expert_0000.safetensors").is_file()
    buffer = ExpertBuffer.load(tmp_path / "experts")
    assert buffer.epochs == 2 and buffer.meta["model_cfg"] == {"width": 8}
    _, again = _distill("mtt", digits, **{**options, "iterations": 1, "learn_labels": True})
    assert again.soft_labels


def test_mtt_stops_with_a_clear_error_when_it_diverges(digits):
    options = {"iterations": 5, "syn_steps": 2, "n_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 1,
               "expert_epochs": 1, "dsa": False, "lr_img": 1e30}
    with pytest.raises(RuntimeError, match="lower lr_img"):
        _distill("mtt", digits, **options)


def test_mtt_holds_its_learned_step_size_above_the_floor(digits):
    """A step-size learning rate large enough to push the student's step size below zero in one update."""
    options = {"iterations": 4, "syn_steps": 2, "n_experts": 1, "expert_train_epochs": 2, "max_start_epoch": 1,
               "expert_epochs": 1, "dsa": False, "lr_img": 1.0, "lr_lr": 1.0, "lr_teacher": 0.01}
    distiller, synset = _distill("mtt", digits, **options)
    assert synset.meta.extra["syn_lr"] >= distiller.MIN_LR_FRACTION * 0.01 * (1 - 1e-6)  # float32 step size
    assert torch.isfinite(synset.images).all()


def test_expert_buffer_round_trips_through_disk(tmp_path):
    trajectories = [torch.randn(4, 37), torch.randn(4, 37)]
    meta = {"model": "convnet", "model_cfg": {"width": 8}, "in_shape": [1, 8, 8], "n_classes": 10, "lr": 0.01}
    ExpertBuffer(trajectories, meta).save(tmp_path)
    loaded = ExpertBuffer.load(tmp_path)
    assert loaded.meta == meta and len(loaded.trajectories) == 2
    for a, b in zip(loaded.trajectories, trajectories):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="model_cfg"):
        loaded.check({"model_cfg": {"width": 16}}, 37, 2)
    with pytest.raises(ValueError, match="epochs"):
        loaded.check({}, 37, 5)


def test_expert_buffer_rejects_a_foreign_file(tmp_path):
    (tmp_path / "expert_0000.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="not a fedcl expert"):
        ExpertBuffer.load(tmp_path)
    with pytest.raises(ValueError, match="no expert trajectories"):
        ExpertBuffer.load(tmp_path / "empty")
