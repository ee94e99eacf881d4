"""Stored forms of a SyntheticSet (multi-formation factor, float16 / uint8 storage), the DM family built on them
(IDM, DANCE), wall-time budgets and the compiled embedding."""

import json

import pytest
import torch

from fedcl.cli import main
from fedcl.data import ClassIndex, load_dataset
from fedcl.distill import Source, create_distiller
from fedcl.runtime import CompiledEmbedding
from fedcl.synthetic import SyntheticMeta, SyntheticSet, SyntheticSetError, expand_tiles, pack_tiles
from fedcl.train import TrainConfig, evaluate_synthetic

SMALL = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _set(factor=1, n=6, shape=(1, 8, 8)):
    torch.manual_seed(0)
    return SyntheticSet(torch.randn(n, *shape), torch.arange(n) % 3, SyntheticMeta("t", 3, n // 3, factor=factor))


@pytest.mark.parametrize("storage", ["float32", "float16", "uint8"])
def test_decode_of_encode_round_trips_within_the_storage_step(storage):
    plain = _set()
    stored = plain.quantised(storage).validate()
    back = SyntheticSet.from_bytes(stored.to_bytes()).decode()
    step = {"float32": 0.0, "float16": 2e-3 * float(plain.images.abs().max()),
            "uint8": float(stored.scale.max()) / 2 if stored.scale is not None else 0.0}[storage]
    assert back.images.dtype == torch.float32 and back.images.shape == plain.images.shape
    assert float((back.images - plain.images).abs().max()) <= step + 1e-6
    assert back.meta.storage == "float32" and torch.equal(back.labels, plain.labels)


def test_byte_accounting_is_exact_for_every_storage_form():
    plain = _set(factor=2, n=6, shape=(3, 8, 8))
    pixels, labels = 6 * 3 * 8 * 8, 6 * 8
    assert plain.nbytes == 4 * pixels + labels
    assert plain.quantised("float16").nbytes == 2 * pixels + labels
    assert plain.quantised("uint8").nbytes == pixels + labels + 2 * 3 * 4  # codes + per-channel scale and offset
    # decoding multiplies the training images, never the stored bytes
    assert len(plain.decode()) == 24 and plain.quantised("uint8").decode().nbytes > plain.quantised("uint8").nbytes


def test_a_factor_f_set_trains_on_f_squared_images_per_stored_image(digits):
    stored = _set(factor=2, n=10, shape=(1, 8, 8))
    stored = SyntheticSet(stored.images, torch.arange(10), SyntheticMeta("t", 10, 1, factor=2))
    decoded = stored.decode()
    assert len(decoded) == 40 and decoded.meta.ipc == 4 and decoded.meta.extra["decoded_from"]["factor"] == 2
    assert torch.equal(decoded.labels, torch.arange(10).repeat_interleave(4))
    # tile k of image i is the k-th quarter of the stored image, upsampled
    quarter = stored.images[3:4, :, 4:8, 0:4]
    assert torch.allclose(decoded.images[3 * 4 + 2], torch.nn.functional.interpolate(
        quarter, size=(8, 8), mode="bilinear", align_corners=False)[0])
    seen = []
    import fedcl.train as train_module
    real_train = train_module.train_model

    def spy(model, images, labels, *args, **kwargs):
        seen.append(len(images))
        return real_train(model, images, labels, *args, **kwargs)

    train_module.train_model = spy
    try:
        evaluate_synthetic(stored, digits, model_cfg=SMALL, n_models=1, config=TrainConfig(epochs=1, dsa=False),
                           device="cpu")
    finally:
        train_module.train_model = real_train
    assert seen == [40]


def test_pack_tiles_places_each_image_in_its_tile():
    images = torch.stack([torch.full((1, 8, 8), float(k)) for k in range(4)])
    stored = pack_tiles(images, 2)
    assert stored.shape == (1, 1, 8, 8)
    assert stored[0, 0, 0, 0] == 0 and stored[0, 0, 0, 7] == 1 and stored[0, 0, 7, 0] == 2 and stored[0, 0, 7, 7] == 3
    assert torch.allclose(expand_tiles(stored, 2), images)  # constant tiles survive the bilinear upsampling


@pytest.mark.parametrize("bad", [{"storage": "int4"}, {"factor": 0}, {"factor": 9}])
def test_invalid_stored_forms_are_refused(bad):
    meta = SyntheticMeta("t", 3, 2, **bad)
    with pytest.raises(SyntheticSetError):
        SyntheticSet(torch.randn(6, 1, 8, 8), torch.arange(6) % 3, meta).validate()
    codes = _set().quantised("uint8")
    with pytest.raises(SyntheticSetError, match="positive scale"):
        SyntheticSet(codes.images, codes.labels, codes.meta, scale=torch.zeros(1), offset=codes.offset).validate()
    with pytest.raises(SyntheticSetError, match="uint8"):
        SyntheticSet(codes.images.float(), codes.labels, codes.meta).validate()


def _fixed_loss(distiller, images, labels, synset, seeds=range(6)):
    """The plain DM distance of a set's decoded images over fixed networks and draws (lower is better)."""
    judge = create_distiller("dm", iterations=1, batch_real=48, model_cfg=SMALL, device="cpu", amp=False)
    index, decoded = ClassIndex(labels, 10), synset.decode()
    with torch.no_grad():
        return sum(float(judge.step(images, index, decoded.images, decoded.labels, torch.arange(10),
                                    torch.Generator().manual_seed(s), net_seed=1000 + s)) for s in seeds)


@pytest.mark.parametrize("method", ["idm", "dance"])
def test_each_dm_family_distiller_lowers_its_distance_and_stores_tiles(digits, method):
    images, labels = digits.train_images, digits.train_labels
    options = {"init": "noise", "batch_real": 48, "model_cfg": SMALL, "device": "cpu", "seed": 1, "lr_img": 1.0}
    if method == "dance":
        options["expert_epochs"] = 1
    start = create_distiller(method, iterations=0, **options).distill(images, labels, ipc=1, n_classes=10)
    synset = create_distiller(method, iterations=40, storage="uint8", **options).distill(
        images, labels, ipc=1, n_classes=10, source=Source.of(digits))
    before, after = _fixed_loss(None, images, labels, start), _fixed_loss(None, images, labels, synset)
    assert after < 0.8 * before, (before, after)
    assert synset.meta.method == method and synset.meta.factor == 2 and synset.images.dtype == torch.uint8
    assert len(synset) == 10 and len(synset.decode()) == 40 and synset.nbytes == 10 * 64 + 10 * 8 + 8


@pytest.mark.parametrize("method", ["idm", "dance"])
def test_dm_family_resumes_exactly(digits, method, tmp_path):
    images, labels = digits.train_images, digits.train_labels
    options = {"batch_real": 16, "model_cfg": SMALL, "device": "cpu", "seed": 3, "amp": False,
               **({"expert_epochs": 0.5} if method == "dance" else {"push_every": 2})}
    whole = create_distiller(method, iterations=6, **options).distill(images, labels, ipc=1, n_classes=10)

    def killed(iteration, loss):
        if iteration == 3:  # after the checkpoint at 3 finished iterations
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_distiller(method, iterations=6, checkpoint_dir=tmp_path, checkpoint_every=3, **options).distill(
            images, labels, ipc=1, n_classes=10, callback=killed)
    resumed = create_distiller(method, iterations=6, checkpoint_dir=tmp_path, resume=True, **options).distill(
        images, labels, ipc=1, n_classes=10)
    assert torch.allclose(whole.images, resumed.images, atol=1e-6)


def test_a_wall_time_budget_stops_cleanly_with_a_checkpoint(digits, tmp_path):
    dm = create_distiller("dm", iterations=100_000, model_cfg=SMALL, device="cpu", batch_real=8, budget_seconds=0.5,
                          checkpoint_dir=tmp_path, compile=False)
    synset = dm.distill(digits.train_images, digits.train_labels, ipc=1, n_classes=10)
    run = synset.meta.extra["iterations_run"]
    assert synset.meta.extra["stopped_by_budget"] and 1 <= run < 100_000
    header = json.loads((tmp_path / "checkpoint.safetensors").read_bytes()[8:][:int.from_bytes(
        (tmp_path / "checkpoint.safetensors").read_bytes()[:8], "little")])
    assert json.loads(header["__metadata__"]["fedcl_checkpoint"])["iteration"] == run


def test_the_compiled_embedding_equals_the_eager_one():
    from fedcl.models import create_model

    net = create_model("convnet", (1, 8, 8), 10, **SMALL)
    other = create_model("convnet", (1, 8, 8), 10, **SMALL)
    x = torch.randn(5, 1, 8, 8)
    compiled = CompiledEmbedding(net, torch.device("cpu"), amp=False)
    with torch.no_grad():
        for model in (net, other):  # a second network of the architecture reuses the compiled call
            assert torch.allclose(compiled(model, x), model.embed(x), atol=1e-5)


def test_cli_idm_and_dance_write_loadable_uint8_factor_sets(tmp_path):
    for method in ("idm", "dance"):
        out = tmp_path / method
        assert main(["distill", "--dataset", "digits", "--method", method, "--ipc", "1", "--iterations", "3",
                     "--width", "8", "--depth", "2", "--factor", "2", "--storage", "uint8", "--seed", "0",
                     "--opt", "expert_epochs=0.2", "--out", str(out)] if method == "dance" else
                    ["distill", "--dataset", "digits", "--method", method, "--ipc", "1", "--iterations", "3",
                     "--width", "8", "--depth", "2", "--factor", "2", "--storage", "uint8", "--seed", "0",
                     "--out", str(out)]) == 0
        synset = SyntheticSet.load(out / "synthetic.safetensors")
        assert synset.meta.storage == "uint8" and synset.meta.factor == 2
        decoded = synset.decode()
        assert decoded.images.dtype == torch.float32 and decoded.image_shape == (1, 8, 8) and len(decoded) == 40
        assert json.loads((out / "report.json").read_text())["nbytes"] == synset.nbytes
    assert main(["distill", "--method", "dc", "--factor", "2", "--out", str(tmp_path / "dc")]) == 2
