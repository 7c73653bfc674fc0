"""The expansion op: one definition of the math (``reference``), several backends behind it.

``expand`` is the front door the engine calls for every target tensor. It prepares what every
backend shares (split-group layout, mean row/column computed once in float64), checks the maps
and dispatches to a backend:

- ``torch``:  ``reference.expand_reference`` (pure PyTorch, any device; the definition).
- ``cpu``:    C++ kernel of ``lemon_ext::expand`` (``csrc/expand_cpu.cpp``), bit-identical.
- ``cuda``:   CUDA kernel of ``lemon_ext::expand`` (``csrc/cuda``), bit-identical by design.
- ``triton``: ``lemon_ext::expand_triton`` (``_triton.py``), within 1 ulp of the output dtype.

``backends()`` says which are usable here and why the others are not.

Maps are host data (the planner builds them on the CPU): with a GPU source and CPU maps the
checks, the group layout and everything the kernels need to know about the maps (largest group,
FREE columns, ...) are computed once per map pair on the host (``prepare_maps``, cached), and the
small per-call arrays go up through pinned memory without blocking; no call reads a value back
from the device, so a pipeline can queue the next copy while this kernel runs. Maps already on
the GPU (direct callers) are checked there, at the cost of a few device syncs per call.

``backend="auto"`` takes a fixed order, not a timed probe: on CUDA tensors ``cuda`` (bit-identical
to the CPU run), then ``triton`` (within 1 ulp: only when the CUDA kernels were not built), then
``torch``; on CPU tensors ``cpu``, then ``torch``. A probe could pick Triton on one run and the CUDA
kernel on the next, so the same seed would no longer give the same bytes; bit-identity decides,
speed only among bit-identical choices. ``LEMON_EXT_BACKEND=<name>`` overrides ``auto`` for the
tensors that backend serves (e.g. ``triton`` to measure it inside the whole pipeline).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import os
import threading
import weakref

import torch

from ..errors import LemonError
from . import _native, reference
from .reference import FREE, MAX_GROUP_SIZE, MEAN, SPLIT_MODES, ZERO, axis_means, group_layout

__all__ = ["expand", "backends", "prepare_maps", "FREE", "MEAN", "ZERO", "SPLIT_MODES"]

BACKENDS = ("cuda", "triton", "cpu", "torch")  # "auto" takes the first usable one for the device
ENV_BACKEND = "LEMON_EXT_BACKEND"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    # find_spec walks sys.path: ~3 ms, paid on every op call before this cache.
    return importlib.util.find_spec("triton") is not None


def backends() -> dict[str, str | None]:
    """Each backend name -> None when usable on this machine, else the reason it is not."""
    hint = _native.BUILD_HINT
    if _native.IMPORT_ERROR is not None:
        cpu = f"C++ kernels not built (lemon_ext._C failed to import: {_native.IMPORT_ERROR}); {hint}"
        cuda = f"CUDA kernels not built (lemon_ext._C failed to import); {hint} with a CUDA torch"
    else:
        cpu = None if _native.has_kernel("CPU") else f"lemon_ext._C has no CPU kernel; {hint}"
        if not _native.has_kernel("CUDA"):
            cuda = (
                "CUDA kernels not built: this torch has no CUDA (CPU wheel)"
                if torch.version.cuda is None
                else "CUDA kernels not built (no CUDA toolkit at build time, or "
                f"LEMON_EXT_SKIP_CUDA_BUILD=1); set CUDA_HOME and {hint}"
            )
        elif not torch.cuda.is_available():
            cuda = "no GPU visible"
        else:
            cuda = None
    if not _triton_installed():
        triton = "triton is not installed (pip install triton)"
    elif not torch.cuda.is_available() and not _interpreting():
        triton = "no GPU (set TRITON_INTERPRET=1 before the first Triton call to interpret on CPU)"
    else:
        triton = None
    return {"torch": None, "cpu": cpu, "cuda": cuda, "triton": triton}


def _serves(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` runs tensors on ``device``."""
    if name == "torch":
        return True
    if name == "cuda":
        return device.type == "cuda"
    if name == "cpu":
        return device.type == "cpu"
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())  # triton


def _resolve_backend(backend: str, device: torch.device) -> str:
    status = backends()
    if backend == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip().lower()
        if forced and forced != "auto":
            if forced not in status:
                raise LemonError(f"{ENV_BACKEND}={forced!r} is no backend; choose one of {sorted(status)} or 'auto'")
            if _serves(forced, device):
                if status[forced] is not None:
                    raise LemonError(f"{ENV_BACKEND}={forced!r}, but it is not available: {status[forced]}")
                return forced
            # a backend that cannot serve this device's tensors leaves them to the fixed order
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in order if status[name] is None)
    if backend not in status:
        raise LemonError(f"unknown backend {backend!r}; choose one of {sorted(status)} or 'auto'")
    if status[backend] is not None:
        raise LemonError(f"backend {backend!r} is not available: {status[backend]}")
    if backend == "cuda" and device.type != "cuda" or backend == "cpu" and device.type != "cpu":
        raise LemonError(f"backend {backend!r} cannot run on a {device.type} tensor; use backend='auto'")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise LemonError("backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1")
    return backend


def _check_maps(source: torch.Tensor, row_map: torch.Tensor, col_map: torch.Tensor,
                group_size: torch.Tensor) -> None:
    rs, cs = source.shape
    for name, m, lo, hi in (("row_map", row_map, MEAN, rs), ("col_map", col_map, FREE, cs)):
        if m.numel() and (int(m.min()) < lo or int(m.max()) >= hi):
            raise LemonError(
                f"{name} entries must be source indices in [0, {hi}) or sentinels >= {lo}; "
                f"got range [{int(m.min())}, {int(m.max())}]"
            )
    if group_size.numel() and int(group_size.max()) > MAX_GROUP_SIZE:
        raise LemonError(
            f"a source column is copied to {int(group_size.max())} target columns; "
            f"at most {MAX_GROUP_SIZE} are supported"
        )


def _as_int64(x: int) -> int:
    """The int64 with x's low 64 bits: the schema's ``int`` is int64, Philox uses the bits."""
    return (int(x) + 2**63) % 2**64 - 2**63


class HostMaps:
    """One (row_map, col_map) pair digested on the host: int64 maps, group layout, ``MapHints``
    and the map ranges, so each call checks them against its source with a few integer compares.
    Built by ``prepare_maps`` (cached per map pair)."""

    def __init__(self, row_map: torch.Tensor, col_map: torch.Tensor):
        self.row_map = row_map.to(torch.int64).contiguous()
        self.col_map = col_map.to(torch.int64).contiguous()
        # The column side (group layout, hints, range) is most of the digest and many pairs share
        # a column map (every tensor reading the hidden stream): digested once per column map.
        self.group_size, self.group_pos, col_hints, self.col_range = _COLUMN_DIGESTS.get(
            (col_map,), lambda: _digest_columns(self.col_map))
        rm = self.row_map
        self.hints = reference.with_row_map(col_hints, rm)
        self.row_range = (int(rm.min()), int(rm.max())) if rm.numel() else None
        self._pinned: dict[str, torch.Tensor] = {}

    def check(self, shape) -> None:
        """LemonError unless the maps index a source of ``shape`` (R_S, C_S) (host ints only)."""
        rs, cs = shape
        for name, rng, lo, hi in (("row_map", self.row_range, MEAN, rs), ("col_map", self.col_range, FREE, cs)):
            if rng is not None and (rng[0] < lo or rng[1] >= hi):
                raise LemonError(
                    f"{name} entries must be source indices in [0, {hi}) or sentinels >= {lo}; "
                    f"got range [{rng[0]}, {rng[1]}]"
                )
        if self.hints.max_group > MAX_GROUP_SIZE:
            raise LemonError(
                f"a source column is copied to {self.hints.max_group} target columns; "
                f"at most {MAX_GROUP_SIZE} are supported"
            )

    def on(self, device: torch.device):
        """(row_map, col_map, group_size, group_pos, hints) on ``device``: host ones as they are,
        else asynchronous copies from pinned buffers kept here (the reference backend on a GPU)."""
        if device.type == "cpu":
            return self.row_map, self.col_map, self.group_size, self.group_pos, self.hints
        up = {}
        for name in ("row_map", "col_map", "group_size", "group_pos", "free_cols"):
            t = getattr(self.hints if name == "free_cols" else self, name)
            if t is None:
                up[name] = None
                continue
            if device.type == "cuda":
                if name not in self._pinned:
                    self._pinned[name] = t.pin_memory()
                up[name] = self._pinned[name].to(device, non_blocking=True)
            else:
                up[name] = t.to(device)
        hints = dataclasses.replace(self.hints, free_cols=up["free_cols"])
        return up["row_map"], up["col_map"], up["group_size"], up["group_pos"], hints


def _digest_columns(col_map: torch.Tensor):
    """(group_size, group_pos, MapHints of the column side, (min, max) or None) of an int64 map."""
    group_size, group_pos = group_layout(col_map)
    hints = reference.column_hints(col_map, group_size)
    col_range = (int(col_map.min()), int(col_map.max())) if col_map.numel() else None
    return group_size, group_pos, hints, col_range


class _IdentityCache:
    """Values built from host tensors, cached by the tensors' identity and in-place version
    (a few entries, least recently used out; thread-safe)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensors: tuple, build):
        key = tuple(id(t) for t in tensors)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                refs, versions, value = hit
                if all(r() is t and v == t._version for r, v, t in zip(refs, versions, tensors)):
                    self._entries.move_to_end(key)
                    return value
        value = build()
        with self._lock:
            self._entries[key] = (tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors), value)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value


# A few entries: the pipeline prepares the next spec's maps while this one launches, and a caller
# repeating one map pair hits. Not more: 256 long-lived entries (3.5 MB of tensors) scattered
# small blocks through the heap and raised the streaming tool's peak RSS by 131 MiB (8: +1 MiB,
# tests/test_cli_subprocess.py's 49 MB -> 287 MB checkpoint, measured against no cache).
# 32 holds every distinct pair of one plan (a Llama layer has ~10, its new layers ~10 more; the
# engine shares one map tensor per axis), so expanding a whole model digests each pair once; the
# column side, 16 column maps.
_MAPS = _IdentityCache(32)
_COLUMN_DIGESTS = _IdentityCache(16)


def prepare_maps(row_map: torch.Tensor, col_map: torch.Tensor) -> HostMaps:
    """The ``HostMaps`` of two host map tensors, cached by identity (and in-place version), so a
    spec's maps are digested once however often it runs; thread-safe (a pipeline's reader thread
    prepares the next spec's maps while the main thread launches this one)."""
    return _MAPS.get((row_map, col_map), lambda: HostMaps(row_map, col_map))


def _to_device(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as ``dtype`` on ``device``; host -> GPU through pinned memory, asynchronously."""
    if t is None:
        return None
    if t.device.type == "cpu" and device.type == "cuda":
        return t.to(dtype).pin_memory().to(device, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def expand(
    source: torch.Tensor,
    row_map: torch.Tensor,
    col_map: torch.Tensor,
    *,
    row_factor: torch.Tensor | None = None,
    col_factor: torch.Tensor | None = None,
    split: str = "none",
    noise_std: float = 0.0,
    seed: int = 0,
    key: int = 0,
    out_dtype: torch.dtype | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Build one target tensor from a 2-D source view (see ``reference`` for the exact math).

    Args:
        source: (R_S, C_S) float tensor (bf16, fp16, fp32 or fp64), any strides.
        row_map: int64 (R_T,): source row, ``ZERO`` or ``MEAN`` per target row. On the CPU
            (as the planner builds them) even for a GPU source: then nothing is read back from
            the device (see the module doc).
        col_map: int64 (C_T,): source column, ``ZERO``, ``MEAN`` or ``FREE`` per target column.
        row_factor / col_factor: float32 (R_T,) / (C_T,) scale factors, or None for 1.
        split: one of ``SPLIT_MODES``: how target columns sharing a source column share its value.
        noise_std: std of the uniform noise for FREE columns and the projection split.
        seed, key: Philox key material (see ``lemon_ext.noise``).
        out_dtype: dtype of the result (default: the source's).
        row_offset: index of row_map[0] in the whole target tensor, for computing a tensor in row
            blocks (row_map = full_row_map[a:b], row_offset = a gives exactly rows a:b of the whole).
        backend: "auto" (see the module doc) or one of ``backends()``.
    Returns:
        (R_T, C_T) tensor of ``out_dtype`` on the source's device.
    """
    if source.dim() != 2:
        raise LemonError(f"expand takes a 2-D source view, got shape {tuple(source.shape)}")
    if split not in SPLIT_MODES:
        raise LemonError(f"unknown split mode {split!r}; choose one of {sorted(SPLIT_MODES)}")
    out_dtype = out_dtype or source.dtype
    device = source.device
    maps = None
    if row_map.device.type == "cpu" and col_map.device.type == "cpu":
        maps = prepare_maps(row_map, col_map)
        maps.check(source.shape)
        rm, cm, gs, gp, hints = maps.row_map, maps.col_map, maps.group_size, maps.group_pos, maps.hints
        row_mean, col_mean = axis_means(source, None, None, need=(hints.has_row_mean, hints.has_col_mean))
    else:  # maps on the device (direct callers): checked there, at the cost of device syncs
        rm = row_map.to(device=device, dtype=torch.int64)
        cm = col_map.to(device=device, dtype=torch.int64)
        gs, gp = group_layout(cm)
        _check_maps(source, rm, cm, gs)
        hints = None
        row_mean, col_mean = axis_means(source, rm, cm)
    name = _resolve_backend(backend, device)
    # float64 work (the engine's losslessness tests) runs the reference in float64 throughout;
    # factors stay float64 there (an fp32 eta alone costs 1e-8 relative error).
    wide = source.dtype == torch.float64 or out_dtype == torch.float64
    if wide and backend == "auto":
        name = "torch"
    elif wide and name != "torch":
        raise LemonError(f"float64 expansion runs on the torch backend only (asked for {name!r})")
    factor_dtype = torch.float64 if wide else torch.float32
    if name == "torch":  # plain torch ops: everything on the source's device
        if maps is not None and device.type != "cpu":
            rm, cm, gs, gp, hints = maps.on(device)
        rf, cf = _to_device(row_factor, device, factor_dtype), _to_device(col_factor, device, factor_dtype)
    else:  # the native ops take host maps and factors beside a GPU source and upload them themselves
        rf, cf = (None if t is None else t.to(factor_dtype) if t.device.type == "cpu" else
                  t.to(device=device, dtype=factor_dtype) for t in (row_factor, col_factor))
    args = (
        source, rm, cm, rf, cf, gs, gp, row_mean, col_mean,
        SPLIT_MODES[split], float(noise_std), _as_int64(seed), int(key) & 0xFFFFFFFF, out_dtype,
        int(row_offset), 0,
    )
    if name == "torch":
        return reference.expand_reference(*args, hints=hints)
    if name == "triton":
        return torch.ops.lemon_ext.expand_triton(*args)
    return torch.ops.lemon_ext.expand(*args)
