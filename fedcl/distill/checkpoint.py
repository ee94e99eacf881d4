"""Checkpoints of a distillation loop, so that a killed run resumes to exactly the result it would have had.

A checkpoint is one safetensors file, written atomically: the loop's tensors (synthetic images, learned step sizes,
label logits), every optimiser's tensor state (momentum buffers, Adam moments and steps), the random generators'
states as uint8 tensors, and in the file's JSON header the iteration, the losses so far, the optimisers' and
schedulers' scalar settings and the run's identity (method, options, data fingerprint).  Nothing is pickled
(`torch.save` of an optimiser state dict would be): loading parses JSON and checks every name, shape and dtype
against the live loop before changing anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from fedcl.files import atomic_write

FORMAT = 1
_HEADER_KEY = "fedcl_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or written by a different run configuration."""


@dataclass
class LoopState:
    """Everything a distillation loop carries from one iteration to the next.

    tensors: learned leaf tensors, updated in place on load.  optimizers / schedulers: by name.
    generator: the loop's sampling generator.  identity: what must match for a checkpoint to be resumed.
    losses: one entry per finished iteration.  start: the iteration to continue from (0 for a fresh run).
    """

    generator: torch.Generator
    tensors: dict[str, torch.Tensor]
    optimizers: dict[str, torch.optim.Optimizer]
    identity: dict[str, Any]
    schedulers: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    start: int = 0

    def save(self, path: str | os.PathLike[str], iteration: int) -> Path:
        """Atomically write the state after `iteration` finished iterations to `path`."""
        tensors = {f"tensor/{name}": t.detach().cpu().contiguous() for name, t in self.tensors.items()}
        tensors.update(_rng_tensors(self.generator))
        optimizers = {}
        for name, optimizer in self.optimizers.items():
            scalars, own = _split_optimizer(optimizer.state_dict(), f"optim/{name}")
            optimizers[name] = scalars
            tensors.update(own)
        header = {"format": FORMAT, "iteration": iteration, "losses": list(self.losses), "identity": self.identity,
                  "optimizers": optimizers,
                  "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()}}
        payload = st_save(tensors, metadata={_HEADER_KEY: json.dumps(header)})
        return atomic_write(path, lambda f: f.write(payload))

    def load(self, path: str | os.PathLike[str], max_iteration: int) -> None:
        """Restore the state from `path` (written by `save` for the same identity); set `start`."""
        header, tensors = _read(Path(path))
        self._check(header, tensors, max_iteration)
        with torch.no_grad():
            for name, t in self.tensors.items():
                t.copy_(tensors[f"tensor/{name}"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(_join_optimizer(header["optimizers"][name], tensors, f"optim/{name}"))
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(header["schedulers"][name])
        _restore_rng(self.generator, tensors)
        self.losses[:] = [float(v) for v in header["losses"]]
        self.start = header["iteration"]

    def _check(self, header: dict[str, Any], tensors: dict[str, torch.Tensor], max_iteration: int) -> None:
        """Raise CheckpointError unless the checkpoint belongs to this loop and is internally consistent."""
        if header.get("format") != FORMAT:
            raise CheckpointError(f"unsupported checkpoint format {header.get('format')!r}")
        identity = _flat(json.loads(json.dumps(self.identity)))
        stored = _flat(header.get("identity"))
        if stored != identity:
            diff = sorted(k for k in set(identity) | set(stored) if stored.get(k) != identity.get(k))
            raise CheckpointError(f"the checkpoint was written by a different run (differs in {', '.join(diff)}); "
                                  "rerun with the same options, or without --resume to start over")
        iteration, losses = header.get("iteration"), header.get("losses")
        if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 <= iteration <= max_iteration:
            raise CheckpointError(f"checkpoint iteration {iteration!r} is outside 0..{max_iteration}")
        if not isinstance(losses, list) or len(losses) != iteration or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses):
            raise CheckpointError("checkpoint losses must be one number per finished iteration")
        for name, t in self.tensors.items():
            saved = tensors.get(f"tensor/{name}")
            if saved is None or saved.shape != t.shape or saved.dtype != t.dtype:
                raise CheckpointError(f"checkpoint tensor {name!r} is missing or has the wrong shape or dtype")
        for key in ("optimizers", "schedulers"):
            names = set(getattr(self, key))
            if not isinstance(header.get(key), dict) or set(header[key]) != names:
                raise CheckpointError(f"checkpoint {key} do not match this loop's {sorted(names)}")
        for name, scheduler in self.schedulers.items():
            saved = header["schedulers"][name]
            if not isinstance(saved, dict) or set(saved) != set(scheduler.state_dict()):
                raise CheckpointError(f"checkpoint scheduler {name!r} does not match this loop's")
        if "rng/generator" not in tensors:
            raise CheckpointError("checkpoint lacks the generator state")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (names the option that differs, e.g. "options.seed")."""
    if not isinstance(value, dict):
        return {prefix or "identity": value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON header and tensors of a checkpoint file; CheckpointError when absent or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} to resume from; run without --resume to start over")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_HEADER_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path} is not a readable fedcl checkpoint ({err}); delete it to start over") \
            from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: checkpoint header must be a JSON object")
    return header, tensors


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """States of the loop's generator and of torch's global generators (CPU, every CUDA device)."""
    states = {"rng/generator": generator.get_state(), "rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def _restore_rng(generator: torch.Generator, tensors: dict[str, torch.Tensor]) -> None:
    try:
        generator.set_state(tensors["rng/generator"])
        if "rng/torch" in tensors:
            torch.set_rng_state(tensors["rng/torch"])
        if torch.cuda.is_available():
            cuda = [tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in tensors]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint random-generator state is invalid: {err}") from None


def _split_optimizer(state_dict: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimiser state dict as (JSON-ready scalars, named tensors)."""
    scalars: dict[str, dict[str, Any]] = {}
    tensors = {}
    for pid, entries in state_dict["state"].items():
        scalars[str(pid)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[str(pid)][key] = value
    return {"state": scalars, "param_groups": state_dict["param_groups"]}, tensors


def _join_optimizer(scalars: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """Inverse of `_split_optimizer`: rebuild the state dict `Optimizer.load_state_dict` expects."""
    if not isinstance(scalars, dict) or not isinstance(scalars.get("state"), dict) or \
            not isinstance(scalars.get("param_groups"), list):
        raise CheckpointError("checkpoint optimiser state is malformed")
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in scalars["state"].items():
        if not pid.isdigit() or not isinstance(entries, dict):
            raise CheckpointError("checkpoint optimiser state is malformed")
        state[int(pid)] = dict(entries)
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            pid, _, name = key[len(prefix) + 1:].partition("/")
            if not pid.isdigit() or not name:
                raise CheckpointError(f"checkpoint has a malformed optimiser tensor name {key!r}")
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": scalars["param_groups"]}
