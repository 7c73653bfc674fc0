"""Run expansion specs as a bounded pipeline: read -> (host-to-device) -> kernel -> (device-to-host) -> sink.

One task per target tensor. Each task reads the one source tensor its spec needs (``fetch_source``),
builds the target (``spec.execute``) and hands it to ``sink(spec, tensor)``; results reach the sink
in spec order, so a sink may stream them into a file whose layout is planned in that order.

Memory bound (host): at most ``max_live_targets`` (2) target tensors are alive at once (one being
written, one being built), plus the prefetched source tensors (``prefetch``, default 1, and the one
in use). A source is released after its last use; a source used by two nearby specs (a new layer
copied from its neighbour, a tied head) is fetched again rather than cached, unless
``source_cache_bytes`` allows keeping it: re-reading costs a page-cache copy, keeping it costs RSS.

CPU backend: three threads (reader, compute = caller's thread, writer); file reads, writes, sha256
and torch kernels all release the GIL, so I/O overlaps compute on 2 cores.

CUDA backend (not yet run on a GPU; on CPU its orchestration runs against a stand-in for streams,
events and pinned memory that defers every copy until its event is waited on:
tests/test_checkpoint_cuda_pipeline.py): sources are read straight into pinned host buffers (a pool
of ``prefetch + 1``), copied host-to-device on a copy stream, executed on a compute stream, copied
device-to-host on a third stream into pinned target buffers (a pool of ``max_live_targets``), and
the writer thread waits for that copy's event before calling the sink. Read, H2D, kernel, D2H and
write of different tensors overlap.

Two callers, one layer above: the engine's large-state-dict path (``expand_state_dict(sd, cfg,
device="cuda")`` on a host state dict runs ``run_specs(plan.specs, sd.__getitem__, lambda s, t:
out.__setitem__(s.name, t), device="cuda")``: a host state dict of many GB through the GPU with
pinned staging; ``copy_out=True``, the default, so the tensors handed over are owned) and the
checkpoint tool (``lemon_ext.checkpoint.expand``: fetch from files, sink into shard writers).
This module imports torch and ``lemon_ext.errors`` only (specs bring their kernels from ``lemon_ext.ops``) and never
imports the engine or the checkpoint tool; its own errors are ``LemonError``. Errors raised by
``fetch_source``, ``spec.execute`` or ``sink`` reach the caller unchanged.
"""
from __future__ import annotations

import inspect
import queue
import threading
import time
from typing import Callable, Iterable

import torch

from ..errors import LemonError

_STOP = object()


class _Abort(Exception):
    """Raised inside a stage when another stage failed."""


def resolve_device(device) -> torch.device:
    """'auto' -> the current CUDA device when one is present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LemonError(f"device '{device}' requested but CUDA is not available")
    return dev


class _CudaCalls:
    """Every CUDA call of ``_run_cuda``, in one place, so the orchestration can be checked without a
    GPU: the tests swap in a stand-in whose copies run only when an event recorded after them is
    waited on (a missing wait or a buffer reused too early then shows as wrong bytes)."""

    @staticmethod
    def new_stream(dev):
        return torch.cuda.Stream(dev)

    @staticmethod
    def new_event():
        return torch.cuda.Event()

    @staticmethod
    def use_stream(stream):
        return torch.cuda.stream(stream)

    @staticmethod
    def pinned(shape, dtype=torch.uint8) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    @staticmethod
    def to_device(host: torch.Tensor, dev) -> torch.Tensor:
        """Host -> device on the current stream (asynchronous from pinned memory)."""
        return host.to(dev, non_blocking=True)

    @staticmethod
    def copy_to_host(dst: torch.Tensor, src: torch.Tensor) -> None:
        """Device -> pinned host on the current stream (asynchronous)."""
        dst.copy_(src, non_blocking=True)

    @staticmethod
    def keep_until_done(t: torch.Tensor, stream) -> None:
        """Tell the caching allocator ``t`` is in use on ``stream`` (allocated on another one)."""
        t.record_stream(stream)


_cuda_calls = _CudaCalls()


def _execute(spec, src, *, seed, dtype, device, backend):
    if isinstance(dtype, dict):  # per-tensor output dtypes (the checkpoint tool's rule)
        dtype = dtype.get(spec.name)
    return spec.execute(src, seed=seed, dtype=dtype, device=device, backend=backend)


class _Stage(threading.Thread):
    """A daemon thread running ``fn``; its exception is kept and re-raised by the caller."""

    def __init__(self, name, fn, abort: threading.Event):
        super().__init__(name=name, daemon=True)
        self.fn, self.abort, self.error = fn, abort, None

    def run(self):
        try:
            self.fn()
        except _Abort:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = e
            self.abort.set()


def _put(q: queue.Queue, item, abort: threading.Event):
    while True:
        if abort.is_set():
            raise _Abort
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            pass


def _get(q: queue.Queue, abort: threading.Event):
    while True:
        if abort.is_set():
            raise _Abort
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            pass


def _acquire(sem: threading.Semaphore, abort: threading.Event):
    while not sem.acquire(timeout=0.1):
        if abort.is_set():
            raise _Abort


def _fetch_accepts_out(fetch_source) -> bool:
    try:
        return "out" in inspect.signature(fetch_source).parameters
    except (TypeError, ValueError):
        return False


def run_specs(
    specs: Iterable,
    fetch_source: Callable,
    sink: Callable,
    *,
    device="auto",
    seed: int = 0,
    dtype: torch.dtype | dict | None = None,
    backend: str = "auto",
    prefetch: int = 1,
    max_live_targets: int = 2,
    source_cache_bytes: int = 0,
    copy_out: bool = True,
    output_device="cpu",
    source_dtypes: dict | None = None,
) -> dict:
    """Execute every spec in order, streaming results to ``sink``.

    Args:
        specs: TensorSpec-like objects (``.name``, ``.source`` (str or None), ``.target_shape``,
            ``.execute(src, *, seed, dtype, device, backend) -> Tensor``).
        fetch_source: ``name -> CPU tensor``; if it accepts ``out=`` (like the checkpoint tool's
            ``SourceCheckpoint.get``)
            the CUDA path reads straight into pinned buffers.
        sink: ``(spec, tensor) -> None``, called in spec order from one thread. On the CUDA path
            with ``copy_out=False`` the tensor is a view of a reused pinned buffer, valid only
            during the call (the checkpoint writer copies it to disk at once).
        dtype: output dtype: None (the source's), one dtype, or {target name: dtype}.
        device: "auto" | "cpu" | "cuda" | "cuda:N" | torch.device where kernels run.
        output_device: where results are handed to the sink ("cpu", or the compute device to
            keep them there; only meaningful with a CUDA device).
        source_dtypes: {source name: dtype}; with a ``fetch_source`` accepting ``out=`` the CUDA
            path then reads each source straight into a pinned buffer (no pageable bounce).
    Returns:
        stage times in seconds {"read", "compute", "sink", "wall"} (CPU path; stages overlap, so
        the largest one bounds the wall time: that is the bottleneck to report).
    """
    specs = list(specs)
    dev = resolve_device(device)
    if dev.type == "cuda":
        return _run_cuda(specs, fetch_source, sink, dev, seed=seed, dtype=dtype, backend=backend,
                  prefetch=prefetch, max_live_targets=max_live_targets, copy_out=copy_out,
                  output_device=torch.device(output_device) if output_device else dev,
                  source_dtypes=source_dtypes or {})
    return _run_cpu(specs, fetch_source, sink, dev, seed=seed, dtype=dtype, backend=backend,
             prefetch=prefetch, max_live_targets=max_live_targets,
             source_cache_bytes=source_cache_bytes)


class _SourceCache:
    """Source tensors by name, released after their last use (counted over the spec list)."""

    def __init__(self, specs, fetch, budget: int):
        self.fetch, self.budget = fetch, budget
        self.remaining: dict[str, int] = {}
        for s in specs:
            if s.source is not None:
                self.remaining[s.source] = self.remaining.get(s.source, 0) + 1
        self.kept: dict[str, torch.Tensor] = {}
        self.kept_bytes = 0
        self.last: tuple[str, torch.Tensor] | None = None

    def take(self, name: str | None):
        if name is None:
            return None
        if self.last is not None and self.last[0] == name:
            t = self.last[1]
        elif name in self.kept:
            t = self.kept[name]
        else:
            t = self.fetch(name)
        self.remaining[name] -= 1
        if self.remaining[name] == 0:
            if name in self.kept:
                self.kept_bytes -= self.kept.pop(name).nbytes
        elif name not in self.kept and self.kept_bytes + t.nbytes <= self.budget:
            self.kept[name] = t
            self.kept_bytes += t.nbytes
        # The previous spec's source stays reachable only if this one reuses it (consecutive specs).
        self.last = (name, t) if self.remaining[name] > 0 else None
        return t


def _run_cpu(specs, fetch_source, sink, dev, *, seed, dtype, backend, prefetch, max_live_targets,
             source_cache_bytes):
    abort = threading.Event()
    q_in: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    q_out: queue.Queue = queue.Queue()
    live = threading.Semaphore(max(1, max_live_targets))
    cache = _SourceCache(specs, fetch_source, source_cache_bytes)
    stats = {"read": 0.0, "compute": 0.0, "sink": 0.0, "wall": 0.0}
    t_start = time.perf_counter()

    def read():
        for spec in specs:
            t = time.perf_counter()
            src = cache.take(spec.source)
            stats["read"] += time.perf_counter() - t
            _put(q_in, (spec, src), abort)
            del src
        _put(q_in, _STOP, abort)

    def write():
        while True:
            item = _get(q_out, abort)
            if item is _STOP:
                return
            spec, t = item
            item = None
            t0 = time.perf_counter()
            sink(spec, t)
            stats["sink"] += time.perf_counter() - t0
            del t
            live.release()

    reader = _Stage("lemon-read", read, abort)
    writer = _Stage("lemon-write", write, abort)
    reader.start()
    writer.start()
    try:
        while True:
            item = _get(q_in, abort)
            if item is _STOP:
                break
            spec, src = item
            item = None
            _acquire(live, abort)
            t0 = time.perf_counter()
            out = _execute(spec, src, seed=seed, dtype=dtype, device=dev, backend=backend)
            stats["compute"] += time.perf_counter() - t0
            del src
            if out.device.type != "cpu":
                out = out.cpu()
            q_out.put((spec, out.contiguous()))
            del out
        q_out.put(_STOP)
    except _Abort:
        pass
    except BaseException:
        abort.set()
        raise
    finally:
        writer.join() if not abort.is_set() else None
        abort.set()  # release a reader blocked on a full queue
        reader.join()
        writer.join()
    for st in (reader, writer):
        if st.error is not None:
            raise st.error
    stats["wall"] = time.perf_counter() - t_start
    return stats


def _run_cuda(specs, fetch_source, sink, dev, *, seed, dtype, backend, prefetch, max_live_targets,
              copy_out, output_device, source_dtypes):
    """CUDA pipeline: pinned staging + three CUDA streams + reader/writer threads (see module doc)."""
    import math

    cu = _cuda_calls
    abort = threading.Event()
    h2d, comp, d2h = (cu.new_stream(dev) for _ in range(3))
    accepts_out = _fetch_accepts_out(fetch_source)
    n_src = max(1, prefetch) + 1
    src_bytes = max([0] + [_nbytes(s.source_shape, source_dtypes.get(s.source, torch.float32))
                           for s in specs if s.source is not None])
    # Pinned source buffers, a free-list: the reader takes one, the compute loop returns it once
    # the H2D copy reading it has completed (event).
    src_pool: queue.Queue = queue.Queue()
    for _ in range(n_src):
        src_pool.put(cu.pinned(max(src_bytes, 1)))
    keep_on_device = output_device.type == "cuda"
    tgt_pool: queue.Queue = queue.Queue()
    if not keep_on_device and not copy_out:
        tgt_bytes = max([1] + [math.prod(s.target_shape) * 8 for s in specs])  # 8: widest dtype
        for _ in range(max(1, max_live_targets)):
            tgt_pool.put(cu.pinned(tgt_bytes))
    live = threading.Semaphore(max(1, max_live_targets))
    q_in: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    q_out: queue.Queue = queue.Queue()

    def read():
        for spec in specs:
            if spec.source is None:
                _put(q_in, (spec, None, None), abort)
                continue
            buf = _get(src_pool, abort)
            shape, sdt = tuple(spec.source_shape), source_dtypes.get(spec.source)
            if accepts_out and sdt is not None:
                need = _nbytes(shape, sdt)
                if buf.numel() < need:  # pool sized for fp32 when dtypes are unknown: grow once
                    buf = cu.pinned(need)
                view = buf[:need].view(sdt).view(shape)
                fetch_source(spec.source, out=view)
            else:
                t = fetch_source(spec.source)
                need = t.numel() * t.element_size()
                if buf.numel() < need:
                    buf = cu.pinned(need)
                view = buf[:need].view(t.dtype).view(t.shape)
                view.copy_(t)
                del t
            _put(q_in, (spec, view, buf), abort)
        _put(q_in, _STOP, abort)

    def write():
        while True:
            item = _get(q_out, abort)
            if item is _STOP:
                return
            spec, t, ev, buf = item
            item = None
            ev.synchronize()
            sink(spec, t)
            del t
            if buf is not None:
                tgt_pool.put(buf)
            live.release()

    reader = _Stage("lemon-read", read, abort)
    writer = _Stage("lemon-write", write, abort)
    reader.start()
    writer.start()
    try:
        while True:
            item = _get(q_in, abort)
            if item is _STOP:
                break
            spec, host, buf = item
            item = None
            src_dev = None
            if host is not None:
                with cu.use_stream(h2d):
                    src_dev = cu.to_device(host, dev)
                    ev_h2d = cu.new_event()
                    ev_h2d.record(h2d)
                comp.wait_event(ev_h2d)
                cu.keep_until_done(src_dev, comp)  # allocated on h2d, used on comp
            _acquire(live, abort)
            with cu.use_stream(comp):
                out = _execute(spec, src_dev, seed=seed, dtype=dtype, device=dev, backend=backend)
                ev_k = cu.new_event()
                ev_k.record(comp)
            if buf is not None:
                ev_h2d.synchronize()  # the pinned source buffer may be reused once H2D is done
                src_pool.put(buf)
            del host, src_dev
            if keep_on_device:
                q_out.put((spec, out, ev_k, None))
                continue
            d2h.wait_event(ev_k)
            with cu.use_stream(d2h):
                if copy_out:
                    host_out = cu.pinned(out.shape, out.dtype)
                    tbuf = None
                else:
                    tbuf = _get(tgt_pool, abort)
                    host_out = tbuf[: out.numel() * out.element_size()].view(out.dtype).view(out.shape)
                cu.copy_to_host(host_out, out)
                cu.keep_until_done(out, d2h)
                ev_out = cu.new_event()
                ev_out.record(d2h)
            del out
            q_out.put((spec, host_out, ev_out, tbuf))
        q_out.put(_STOP)
    except _Abort:
        pass
    except BaseException:
        abort.set()
        raise
    finally:
        writer.join() if not abort.is_set() else None
        abort.set()
        reader.join()
        writer.join()
    for st in (reader, writer):
        if st.error is not None:
            raise st.error
    return {}


def _nbytes(shape, dtype) -> int:
    import math
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
