"""The federated server's checkpoint: what a restarted server needs to continue after its last completed round.

After every completed round the ServerApp writes, under `OUT/checkpoint/`:

- `model-RRRR.safetensors`: the global model's arrays after round RRRR;
- `memory-RRRR/`: the pooled synthetic sets after round RRRR, in the core memory format (`fedcl.memory`'s
  `DistilledMemory.save`: one SyntheticSet safetensors file per set and the `memory.json` index), written whole
  into a folder of its own, so the folder of the last committed checkpoint is never touched;
- `state.json`: the round, the settings, the rounds.csv rows so far, the traffic counters and the name of the
  memory folder.

`state.json` is written last and atomically: it is the commit point, so a crash at any moment leaves the previous
complete checkpoint readable.  Files and folders it no longer names are removed afterwards.  Loading treats every
file as untrusted (JSON and safetensors only, every value type-checked, arrays checked against the model, every set
validated against the strategy's limits) and raises `CheckpointError` naming the problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcl.files import atomic_write, write_json
from fedcl.flower.results import COLUMNS, OPTIONAL_COLUMNS
from fedcl.flower.settings import changed_settings
from strategies import SyntheticMemory, TrafficLog

#: Where under the run's out_dir the checkpoint lives, and its commit file.
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
_FORMAT = 2
#: Settings a resumed run may change (everything else must match the checkpoint).
RESUMABLE_CHANGES = frozenset({"resume", "num-rounds", "out-dir", "device", "round-timeout", "data-root"})
_MODEL_FILE = re.compile(r"model-[0-9]{4,}\.safetensors")
_MEMORY_DIR = re.compile(r"memory-[0-9]{4,}")
_MAX_STATE_BYTES = 64 * 2**20
_MAX_MODEL_BYTES = 4 * 2**30


class CheckpointError(ValueError):
    """A server checkpoint is missing a part, corrupt, or was written by a run with other settings."""


@dataclass
class ServerCheckpoint:
    """A loaded checkpoint: the last completed round, the global model after it, the rounds.csv rows up to it
    and the traffic log (the pooled memory is restored into the strategy's memory while loading)."""

    server_round: int
    arrays: ArrayRecord
    rows: list[dict[str, Any]]
    traffic: TrafficLog


def save_checkpoint(out_dir: str | os.PathLike[str], *, settings: dict[str, Any], server_round: int,
                    arrays: ArrayRecord, rows: list[dict[str, Any]], traffic: TrafficLog,
                    memory: SyntheticMemory | None) -> Path:
    """Write the checkpoint of completed round `server_round` (model, memory, then state.json); return its path."""
    directory = Path(out_dir) / CHECKPOINT_DIR
    model_file = f"model-{server_round:04d}.safetensors"
    payload = st_save({name: torch.from_numpy(np.array(a.numpy(), copy=True)) for name, a in arrays.items()})
    atomic_write(directory / model_file, lambda f: f.write(payload))
    memory_dir = f"memory-{server_round:04d}" if memory is not None else None
    if memory is not None:
        shutil.rmtree(directory / memory_dir, ignore_errors=True)  # left by a crash before this round's commit
        memory.save(directory / memory_dir)
    write_json(directory / STATE_FILE, {"format": _FORMAT, "round": server_round, "settings": settings,
                                        "model": model_file, "memory": memory_dir, "rows": rows,
                                        "traffic": traffic.to_json()})
    _remove_unreferenced(directory, model_file, memory_dir)
    return directory / STATE_FILE


def load_checkpoint(out_dir: str | os.PathLike[str], *, settings: dict[str, Any], reference: ArrayRecord,
                    memory: SyntheticMemory | None) -> ServerCheckpoint | None:
    """The checkpoint under `out_dir` (None if there is none), with the memory restored into `memory`.

    settings: the resuming run's (kebab-case) settings; reference: the model's arrays, whose names, dtypes and
    shapes the checkpointed arrays must match.  Raise CheckpointError on anything wrong.
    """
    directory = Path(out_dir) / CHECKPOINT_DIR
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    state = _read_state(path)
    _check_settings(state["settings"], settings)
    try:
        traffic = TrafficLog.from_json(state["traffic"])
        if memory is not None and state["memory"] is not None:
            memory.load(directory / state["memory"])
        elif memory is not None:
            raise ValueError("it holds no synthetic memory but this run's strategy keeps one")
        elif state["memory"] is not None:
            raise ValueError("it holds a synthetic memory but this run's strategy keeps none")
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    arrays = _read_arrays(directory / state["model"], reference)
    return ServerCheckpoint(server_round=state["round"], arrays=arrays, rows=state["rows"], traffic=traffic)


def _read_state(path: Path) -> dict[str, Any]:
    """state.json parsed and type-checked (round, settings, model file name, memory folder, rows, traffic)."""
    if path.stat().st_size > _MAX_STATE_BYTES:
        raise CheckpointError(f"checkpoint {path} is oversize ({path.stat().st_size} bytes)")
    try:
        state = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {path} is not valid JSON: {err}") from None
    expected = {"format", "round", "settings", "model", "memory", "rows", "traffic"}
    if not isinstance(state, dict) or set(state) != expected:
        raise CheckpointError(f"checkpoint {path} must be a JSON object with keys {sorted(expected)}")
    if state["format"] != _FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state['format']!r}; this fedcl reads {_FORMAT}")
    server_round = state["round"]
    if type(server_round) is not int or server_round < 1:
        raise CheckpointError(f"checkpoint {path}: round must be a positive integer, got {server_round!r}")
    if not isinstance(state["settings"], dict):
        raise CheckpointError(f"checkpoint {path}: settings must be a JSON object")
    if not isinstance(state["model"], str) or not _MODEL_FILE.fullmatch(state["model"]):
        raise CheckpointError(f"checkpoint {path}: model must name a model-RRRR.safetensors file")
    if state["memory"] is not None and not (isinstance(state["memory"], str)
                                            and _MEMORY_DIR.fullmatch(state["memory"])):
        raise CheckpointError(f"checkpoint {path}: memory must name a memory-RRRR folder or be null")
    rows = state["rows"]
    if not (isinstance(rows, list) and len(rows) == server_round + 1
            and all(_is_row(row, i) for i, row in enumerate(rows))):
        raise CheckpointError(f"checkpoint {path}: rows must be one rounds.csv row (columns {list(COLUMNS)}) per "
                              f"round 0..{server_round}")
    return state


def _is_row(row: Any, server_round: int) -> bool:
    """Whether `row` is the rounds.csv row of `server_round`: every column, numbers where numbers belong."""
    if not isinstance(row, dict) or set(row) != set(COLUMNS) or row["round"] != server_round:
        return False
    text = {"failure_reasons"} | {k for k in OPTIONAL_COLUMNS if row[k] == ""}
    return isinstance(row["failure_reasons"], str) and all(
        type(row[k]) in (int, float) and math.isfinite(row[k]) for k in COLUMNS if k not in text)


def _check_settings(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a run whose settings differ (except the RESUMABLE_CHANGES) from the checkpoint's."""
    differ = changed_settings(saved, current, ignore=RESUMABLE_CHANGES)
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise CheckpointError(f"cannot resume: the checkpoint was written with other settings ({changes}); use "
                              f"the same settings or another --out")


def _read_arrays(path: Path, reference: ArrayRecord) -> ArrayRecord:
    """The checkpointed model arrays, checked against `reference` (names, dtypes, shapes, finite values)."""
    try:
        if path.stat().st_size > _MAX_MODEL_BYTES:
            raise CheckpointError(f"checkpoint model {path} is oversize")
        tensors = st_load(path.read_bytes())
    except (OSError, SafetensorError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"checkpoint model {path} is missing or corrupt: {err}") from None
    if set(tensors) != set(reference):
        raise CheckpointError(f"checkpoint model {path} holds arrays {sorted(tensors)[:5]}..., not this model's")
    for name, tensor in tensors.items():
        expected = reference[name]
        expected_dtype = torch.from_numpy(np.zeros(0, dtype=expected.dtype)).dtype
        if tensor.dtype != expected_dtype or list(tensor.shape) != list(expected.shape):
            raise CheckpointError(f"checkpoint model {path}: array {name!r} is {tensor.dtype}{tuple(tensor.shape)}"
                                  f", the model needs {expected.dtype}{tuple(expected.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint model {path}: array {name!r} holds NaN or Inf")
    return ArrayRecord({name: Array(tensors[name].numpy()) for name in reference})


def _remove_unreferenced(directory: Path, model_file: str, memory_dir: str | None) -> None:
    """Delete model files other than `model_file` and memory folders other than `memory_dir`."""
    for old in directory.glob("model-*.safetensors"):
        if old.name != model_file:
            old.unlink(missing_ok=True)
    for old in directory.glob("memory-*"):
        if old.name != memory_dir and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
