"""Device choice and seeding: the same code path on CUDA and CPU, reproducible from one integer seed; and the code
version a result was made with."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None) picks CUDA when present, else CPU; asking for CUDA without one is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available here; use --device cpu")
    return resolved


#: The folders whose code shapes a result (the library, the strategies, the benchmark scripts).
CODE_DIRS = ("fedcl", "strategies", "simulations")


@functools.cache
def code_version() -> str:
    """The version of the code a result is made with, for benchmarks that reuse finished runs: the git tree
    hashes of `CODE_DIRS` in this checkout (unchanged by commits that touch only docs or tests), marked "+dirty"
    when they hold uncommitted changes; outside a git checkout, the installed package's version."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        trees = git("rev-parse", *(f"HEAD:{d}" for d in CODE_DIRS)).split()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_DIRS)
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"fedcl {version('fedcl')}"
        except PackageNotFoundError:
            return "unknown"
    return "-".join(tree[:12] for tree in trees) + ("+dirty" if dirty else "")


def saved_run(path: str | Path, settings: dict[str, Any], make: Callable[[], Any]) -> tuple[Any, bool]:
    """For benchmarks that finish over several invocations: the JSON result an earlier invocation saved at `path`
    when its settings and code version (`code_version`) equal these (compared after a JSON round trip), else
    `make()`'s result, saved there at once (atomically); and whether it was reused."""
    from fedcl.files import write_json

    settings = json.loads(json.dumps({**settings, "code": code_version()}))
    path = Path(path)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved["result"], True
    result = make()
    write_json(path, {"settings": settings, "result": result})
    return result, False


def generator(seed: int) -> torch.Generator:
    """A CPU generator for all sampling decisions (indices, augmentation draws); moved tensors follow it."""
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. a model's initialisation) under a fixed global seed without disturbing the caller's RNG."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from the kernel's
    CPU flags at run time: machines of one kind differ, and without these instructions bf16 is emulated (slow)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split()}
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def amp_enabled(device: torch.device, amp: bool | None) -> bool:
    """Whether forward passes run under bfloat16 autocast: `amp=None` (auto) turns it on for a CPU with native
    bf16 (about 1.8x faster ConvNet embeddings there, class-mean embeddings within 0.2 %) and leaves CUDA in
    float32; True turns it on on CUDA and on bf16 CPUs; False keeps float32."""
    if device.type == "cuda":
        return bool(amp)
    return device.type == "cpu" and amp is not False and cpu_has_bf16()


def autocast(device: torch.device, enabled: bool | None) -> contextlib.AbstractContextManager[None]:
    """bfloat16 autocast where `amp_enabled(device, enabled)`; a no-op elsewhere."""
    if amp_enabled(device, enabled):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS (glibc `mallopt`).

    PyTorch allocates a fresh multi-megabyte tensor for every activation; by default glibc serves such blocks
    with mmap and unmaps them on free, so every forward pass pays page faults on memory it just released.
    Turning mmap off and raising the trim threshold lets the heap reuse those pages (measured on the project's
    2-core CPU: ConvNet-3 forward of 256 Fashion-MNIST images 383 -> 219 ms).  Process-wide and idempotent;
    a no-op where glibc is not the allocator.  Returns whether the setting took effect.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**34))
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


class CompiledEmbedding:
    """`net.embed(x)` as float32, under the bf16 autocast where `amp_enabled`, through one `torch.compile`d
    functional call of a template network: every network of the template's architecture shares the compiled
    kernels, because its parameters are inputs of the call, not constants.

    Inductor fuses the elementwise passes between the convolutions (normalisation, activation, pooling), which
    dominate a ConvNet forward on CPU once the convolutions run in bf16: about 2x faster for no-grad embeddings of
    real batches.  If compilation fails (no C++ compiler, an unsupported op), it warns once and runs eagerly.
    """

    def __init__(self, template: torch.nn.Module, device: torch.device, amp: bool | None) -> None:
        # Inductor's C++ build looks for CUDA and logs a warning on a CPU-only machine; nothing to act on.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.embedder, self.device, self.amp = _Embedder(template), device, amp
        self.bf16 = amp_enabled(device, amp)  # decided once, outside the traced function
        # Static kernels for the first batch shape; a second shape (a class with fewer real images than the batch,
        # as a federated client's often has) makes torch recompile once with dynamic shapes instead of once per
        # shape up to its recompile limit.
        self._compiled = torch.compile(self._embed, dynamic=None)
        self.failed = False

    def _embed(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = torch.func.functional_call(self.embedder, params, (x,))
        return out.float()

    def __call__(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
                return self._compiled({f"net.{name}": t for name, t in state.items()}, x)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager path
                self.failed = True
                warnings.warn(f"torch.compile of the embedding failed ({type(err).__name__}: {err}); "
                              "running it eagerly", stacklevel=2)
        with autocast(self.device, self.amp):
            return net.embed(x).float()


class _Embedder(torch.nn.Module):
    """A module whose forward is `net.embed` (what `torch.func.functional_call` can call)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)
