"""Property-based fuzzing of every loader of untrusted input: random bytes, shapes, dtypes and metadata fed to the
SyntheticSet readers, the Flower message decoder, the MTT expert loader, the IDX reader, the server checkpoint
loader and the run settings.  Each must end in a clear, typed error (our ValueError subclasses), never another
exception, a hang or a partial write."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedcl.data.datasets import read_idx
from fedcl.distill.mtt import ExpertBuffer
from fedcl.flower.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedcl.flower.records import META_KEY, SYNTHETIC_KEY, synset_from_record, synset_to_record
from fedcl.flower.settings import FedSettings
from fedcl.synthetic import SyntheticMeta, SyntheticSet, SyntheticSetError
from strategies import SyntheticMemory, TrafficLog

#: Derandomized: every run tries the same 150 inputs per test, so a CI run is reproducible; a failure found while
#: exploring (e.g. `pytest --hypothesis-seed=N` with `derandomize` off) is pinned with `@example`.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

#: Any JSON value (nested a little), the raw material of metadata, state files and configs.
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
DTYPES = st.sampled_from(["float32", "float16", "float64", "int64", "int32", "uint8", "bool", "complex64"])
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


def _mutated(value, data: st.DataObject):
    """`value` (JSON-like) with one randomly chosen member, at any depth, replaced by random JSON."""
    if isinstance(value, (dict, list)) and value and data.draw(st.booleans()):
        keys = sorted(value) if isinstance(value, dict) else list(range(len(value)))
        key = data.draw(st.sampled_from(keys))
        copy = dict(value) if isinstance(value, dict) else list(value)
        copy[key] = _mutated(value[key], data)
        return copy
    return data.draw(JSON)


def _valid_set() -> SyntheticSet:
    meta = SyntheticMeta(method="fuzz", n_classes=3, ipc=2, mean=(0.5,), std=(0.25,))
    return SyntheticSet(images=torch.randn(6, 1, 4, 4), labels=torch.tensor([0, 0, 1, 1, 2, 2]), meta=meta)


VALID_BYTES = _valid_set().to_bytes()


def _array(dtype: str, shape: tuple[int, ...], fill: int) -> np.ndarray:
    with np.errstate(all="ignore"):  # overflow / casting of the fill values is part of the fuzz
        return np.asarray(np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * fill).astype(dtype)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_a_synthetic_set_error(data):
    with pytest.raises(SyntheticSetError):
        SyntheticSet.from_bytes(data)


@FUZZ
@given(st.data())
def test_mutated_valid_bytes_load_or_fail_cleanly(data):
    raw = bytearray(VALID_BYTES)
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        SyntheticSet.from_bytes(bytes(raw[:cut]))
    except SyntheticSetError:
        pass  # a successful load is fine too: it passed validation


@FUZZ
@given(header=JSON, meta=JSON)
def test_random_safetensors_headers_and_metadata(header, meta):
    """A well-framed file whose header (or fedcl metadata) is any JSON."""
    if isinstance(header, dict):
        header = {**header, "__metadata__": {"fedcl": json.dumps(meta)}}
    text = json.dumps(header).encode()
    with pytest.raises(SyntheticSetError):
        SyntheticSet.from_bytes(len(text).to_bytes(8, "little") + text)


TORCH_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                 torch.int32, torch.uint8, torch.bool])


@FUZZ
@given(names=st.lists(st.sampled_from(["images", "labels", "lrs", "other"]), max_size=4, unique=True),
       dtypes=st.lists(TORCH_DTYPES, min_size=4, max_size=4), shapes=st.lists(SHAPES, min_size=4, max_size=4),
       data=st.data())
def test_well_formed_files_with_random_tensors_and_metadata(names, dtypes, shapes, data):
    """Real safetensors files (any tensors, any dtype) whose fedcl metadata is a mutation of a valid one."""
    tensors = {name: torch.from_numpy(_array("float64", shape, 3)).to(dtype)
               for name, dtype, shape in zip(names, dtypes, shapes, strict=False)}
    meta = _mutated(json.loads(_valid_set().meta.to_json()), data)
    from safetensors.torch import save as st_save

    payload = st_save(tensors, metadata={"fedcl": json.dumps(meta)})
    try:
        synset = SyntheticSet.from_bytes(payload)
    except SyntheticSetError:
        return
    assert synset.images.dtype == torch.float32 and synset.labels.shape[0] == len(synset)


@FUZZ
@given(meta=JSON)
def test_random_metadata_json(meta):
    try:
        parsed = SyntheticMeta.from_json(json.dumps(meta))
    except SyntheticSetError:
        return
    assert isinstance(parsed.n_classes, int) and isinstance(parsed.mean, tuple)


@FUZZ
@given(image_dtype=DTYPES, image_shape=SHAPES, label_dtype=DTYPES, label_shape=SHAPES,
       n_classes=st.integers(-2, 12), fill=st.sampled_from([1, -1, 10**6]))
def test_random_tensors_and_metadata_are_validated(image_dtype, image_shape, label_dtype, label_shape, n_classes,
                                                   fill):
    images = torch.from_numpy(_array(image_dtype, image_shape, fill))
    labels = torch.from_numpy(_array(label_dtype, label_shape, fill))
    meta = SyntheticMeta(method="fuzz", n_classes=n_classes, ipc=1)
    try:
        synset = SyntheticSet.from_tensors({"images": images, "labels": labels}, meta)
    except SyntheticSetError:
        return
    assert synset.images.dtype == torch.float32 and len(synset) > 0  # what validation promises


@FUZZ
@given(names=st.lists(st.sampled_from(["images", "labels", "lrs", "other"]), min_size=0, max_size=4, unique=True),
       dtypes=st.lists(DTYPES, min_size=4, max_size=4), shapes=st.lists(SHAPES, min_size=4, max_size=4),
       meta=JSON | st.just(_valid_set().meta.to_json()), corrupt=st.booleans(), noise=st.binary(max_size=64))
def test_random_flower_records_are_a_synthetic_set_error_or_valid(names, dtypes, shapes, meta, corrupt, noise):
    arrays = {}
    for name, dtype, shape in zip(names, dtypes, shapes, strict=False):
        array = Array(_array(dtype, shape, 1))
        if corrupt:  # declared dtype/shape kept, serialised bytes replaced
            array = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=noise)
        arrays[name] = array
    content = RecordDict({SYNTHETIC_KEY: ArrayRecord(arrays),
                          META_KEY: ConfigRecord({"meta": meta if isinstance(meta, str) else json.dumps(meta)})})
    try:
        synset = synset_from_record(content, image_shape=(1, 4, 4), n_classes=3)
    except SyntheticSetError:
        return
    assert synset.image_shape == (1, 4, 4)


@FUZZ
@given(name=st.sampled_from(["images", "labels", "lrs"]), dtype=DTYPES, shape=SHAPES, fill=st.sampled_from([1, -1, 1e40]),
       data=st.data())
def test_a_valid_record_with_one_part_replaced(name, dtype, shape, fill, data):
    """A valid message with one array replaced by another dtype/shape/values, or its metadata mutated."""
    content = synset_to_record(_valid_set())
    if data.draw(st.booleans()):
        content[SYNTHETIC_KEY][name] = Array(_array(dtype, shape, fill))
    else:
        meta = _mutated(json.loads(content[META_KEY]["meta"]), data)
        content[META_KEY] = ConfigRecord({"meta": json.dumps(meta)})
    try:
        synset = synset_from_record(content, image_shape=(1, 4, 4), n_classes=3)
    except SyntheticSetError:
        return
    assert synset.image_shape == (1, 4, 4) and synset.meta.n_classes == 3


def test_valid_record_round_trips():
    assert len(synset_from_record(synset_to_record(_valid_set(), "float16"), image_shape=(1, 4, 4),
                                  n_classes=3)) == 6


@FUZZ
@given(payload=st.binary(max_size=300), image_dtype=DTYPES, shape=SHAPES)
def test_a_failed_save_leaves_the_old_file_untouched(payload, image_dtype, shape):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "set.safetensors"
        path.write_bytes(payload)
        bad = SyntheticSet(images=torch.from_numpy(_array(image_dtype, shape, -1)), labels=torch.tensor([7]),
                           meta=SyntheticMeta(method="fuzz", n_classes=3, ipc=1))
        with pytest.raises(SyntheticSetError):
            bad.save(path)
        assert path.read_bytes() == payload
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["set.safetensors"]  # no temporary left over


@FUZZ
@given(files=st.lists(st.binary(max_size=200) | st.just(VALID_BYTES), min_size=1, max_size=3))
def test_random_expert_files_are_a_value_error(files):
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(files):
            (Path(tmp) / f"expert_{i:04d}.safetensors").write_bytes(data)
        with pytest.raises(ValueError):
            ExpertBuffer.load(tmp)


@FUZZ
@given(dtype=TORCH_DTYPES, shape=SHAPES, meta=JSON, name=st.sampled_from(["trajectory", "other"]))
def test_well_formed_expert_files_with_random_tensors_and_metadata(dtype, shape, meta, name):
    """A real safetensors file: any tensor, any metadata; loading and checking it either works or is a ValueError."""
    from safetensors.torch import save as st_save

    payload = st_save({name: torch.from_numpy(_array("float64", shape, 1)).to(dtype)},
                      metadata={"fedcl_expert": json.dumps(meta)})
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "expert_0000.safetensors").write_bytes(payload)
        try:
            ExpertBuffer.load(tmp).check({"model": "convnet"}, n_params=3, min_epochs=1)
        except ValueError:
            return
    assert isinstance(meta, dict) and meta.get("model") == "convnet"  # only a matching buffer passes the check


@FUZZ
@given(data=st.binary(max_size=300), magic=st.booleans(), packing=st.sampled_from(["raw", "gzip", "bad gzip"]),
       cut=st.integers(0, 40))
def test_random_idx_files_are_a_value_error_or_an_array(data, magic, packing, cut):
    if magic:
        data = b"\x00\x00\x08" + data
    stored = {"raw": data, "gzip": gzip.compress(data), "bad gzip": gzip.compress(data)[:cut] + data}[packing]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x.idx" if packing == "raw" else "x.idx.gz")
        path.write_bytes(stored)
        try:
            array = read_idx(path)
        except ValueError:
            return
        assert array.dtype == np.uint8 and array.size == len(data) - 4 - 4 * data[3]


def _checkpoint_dir(csv_row) -> tuple[Path, dict, ArrayRecord]:
    tmp = Path(tempfile.mkdtemp())
    arrays = ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.float32))})
    memory = SyntheticMemory(image_shape=(1, 4, 4), n_classes=3, max_images=100, max_bytes=2**20)
    memory.add(5, _valid_set())
    traffic = TrafficLog()
    traffic[1].uplink_bytes = 10
    traffic.fail(1, 6, "client error")
    config = FedSettings(out_dir=str(tmp)).to_config()
    save_checkpoint(tmp, settings=config, server_round=1, arrays=arrays, rows=[csv_row(0), csv_row(1)], traffic=traffic,
                    memory=memory)
    return tmp, config, arrays


@FUZZ
@given(field=st.sampled_from(["format", "round", "settings", "model", "memory", "rows", "traffic", None]),
       value=JSON, model_bytes=st.none() | st.binary(max_size=200), raw=st.none() | st.binary(max_size=100))
def test_corrupt_checkpoints_are_a_checkpoint_error(csv_row, field, value, model_bytes, raw):
    tmp, config, arrays = _checkpoint_dir(csv_row)
    state_path = tmp / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    if field is None:
        state = value
    else:
        state[field] = value
    state_path.write_bytes(raw if raw is not None else json.dumps(state).encode())
    if model_bytes is not None:
        (tmp / "checkpoint" / "model-0001.safetensors").write_bytes(model_bytes)
    memory = SyntheticMemory(image_shape=(1, 4, 4), n_classes=3, max_images=100, max_bytes=2**20)
    try:
        checkpoint = load_checkpoint(tmp, settings=config, reference=arrays, memory=memory)
    except CheckpointError:
        return
    assert checkpoint.server_round >= 1 and set(checkpoint.arrays) == {"w"}  # the mutation left it valid


@FUZZ
@given(data=st.data())
def test_checkpoints_with_one_nested_value_replaced(csv_row, data):
    tmp, config, arrays = _checkpoint_dir(csv_row)
    state_path = tmp / "checkpoint" / "state.json"
    state = _mutated(json.loads(state_path.read_text()), data)
    state_path.write_text(json.dumps(state))
    memory = SyntheticMemory(image_shape=(1, 4, 4), n_classes=3, max_images=100, max_bytes=2**20)
    try:
        checkpoint = load_checkpoint(tmp, settings=config, reference=arrays, memory=memory)
    except CheckpointError:
        return
    assert checkpoint.server_round >= 1 and set(checkpoint.arrays) == {"w"}


def test_an_intact_checkpoint_loads(csv_row):
    tmp, config, arrays = _checkpoint_dir(csv_row)
    memory = SyntheticMemory(image_shape=(1, 4, 4), n_classes=3, max_images=100, max_bytes=2**20)
    assert load_checkpoint(tmp, settings=config, reference=arrays, memory=memory).server_round == 1
    assert len(memory) == 6


@FUZZ
@given(data=JSON)
def test_random_traffic_logs_are_a_value_error(data):
    try:
        traffic = TrafficLog.from_json(data)
    except ValueError:
        return
    assert all(isinstance(r, int) for r in traffic.rounds)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(["num-rounds", "screen", "alpha", "resume", "ipc", "memory",
                                               "strategy", "seed", "other"]),
                              st.one_of(JSON, st.integers(0, 50), st.floats(0.01, 10.0), st.booleans(),
                                        st.sampled_from(["fedavg", "fed-distill", "hybrid", "all", "latest", "none",
                                                         "embedding"])), max_size=5))
@example(config={"num-rounds": float("inf")})  # once an OverflowError, found by this test
@example(config={"num-rounds": 3, "seed": 7, "alpha": 0.25, "ipc": 4, "strategy": "hybrid"})  # parses: every value kept
def test_random_run_configs_are_a_value_error(config):
    try:
        parsed = FedSettings.from_config(config)
    except ValueError:
        return
    defaults, read = FedSettings().to_config(), parsed.to_config()
    for key, default in defaults.items():
        assert type(read[key]) is type(default), (key, read[key])  # every value has its field's type
        if key not in config:
            assert read[key] == default, key  # keys it was not given keep their defaults
    for key in config.keys() & defaults.keys():
        if isinstance(config[key], type(defaults[key])) and config[key] == config[key]:  # (NaN is not)
            assert read[key] == config[key], key  # a value of the right type is taken as given
    assert FedSettings.from_config(read).to_config() == pytest.approx(read, nan_ok=True)  # and reads back the same
