"""Run expansion specs as a bounded pipeline: read -> (host-to-device) -> kernel -> (device-to-host) -> sink.

One task per target tensor. Each task reads the one source tensor its spec needs (``fetch_source``),
builds the target (``spec.execute``) and hands it to ``sink(spec, tensor)``; results reach the sink
in spec order, so a sink may stream them into a file whose layout is planned in that order.

Memory bound (host): at most ``max_live_targets`` (2) target tensors are alive at once (one being
written, one being built), plus the prefetched source tensors (``prefetch``, default 1, and the one
in use). A source is released after its last use; a source used by two nearby specs (a new layer
copied from its neighbour, a tied head) is fetched again rather than cached, unless
``source_cache_bytes`` allows keeping it: re-reading costs a page-cache copy, keeping it costs RSS.

CPU backend: three threads (reader, compute = caller's thread, writer); file reads, writes, hashing
and torch kernels all release the GIL, so I/O overlaps compute on 2 cores.

CUDA backend (not yet run on a GPU; on CPU its orchestration runs against stand-ins for streams,
events, kernels and pinned memory: tests/test_checkpoint_cuda_pipeline.py (bytes) and
tests/test_pipeline_cuda_overlap.py (order of issue, pinned bytes, hand-over)). Sources are read
straight into page-locked host buffers (a pool of ``prefetch + 1``), copied host-to-device on a
copy stream, expanded on a compute stream, copied device-to-host on a third stream into page-locked
target buffers (a pool of ``max_live_targets``), and the writer thread waits for that copy's event
before handing the tensor over. The main thread only queues work: it never waits for the device
(``ops.expand`` reads nothing back: the maps are host data, checked once per map pair on the host;
a source buffer goes back to the reader with the event of the copy that reads it, and the reader,
not the main thread, waits for that event before refilling it). So the copy of tensor i+1 is
queued while kernel i runs, and read, H2D, kernel, D2H and write of different tensors overlap.

Pinned memory (host, page-locked), exactly: ``(prefetch + 1) x`` the largest source tensor in its
own dtype ``+ max_live_targets x`` the largest target tensor in its output dtype, each rounded up
to a 4 KiB page (registered with ``cudaHostRegister``: the caching host allocator behind
``pin_memory=True`` rounds every block up to a power of two, up to 2x). For a Llama-3-8B head
grown to 8192 wide in bf16 that is 2 x 2.1 GB for targets, not 2 x 8.4 GB. Per-call map and
factor uploads use the caching host allocator (a few MB). Stats report ``pinned_bytes``.
Host results (``copy_out=True``, the default for ``expand_state_dict(sd, device="cuda")``) are
staged through the same reused target buffers and copied into ordinary pageable tensors by the
writer thread, so no result stays page-locked. Results kept on the device (``output_device``
cuda) are made on the private compute stream; before the hand-over the writer waits for their
kernel and marks them in use on the caller's current stream (``record_stream``), so the caching
allocator never gives their memory to the pipeline's next tensor while the caller still reads it.

Two callers, one layer above: the engine's large-state-dict path (``expand_state_dict(sd, cfg,
device="cuda")`` on a host state dict runs ``run_specs(plan.specs, sd.__getitem__, lambda s, t:
out.__setitem__(s.name, t), device="cuda")``: a host state dict of many GB through the GPU with
pinned staging; ``copy_out=True``, the default, so the tensors handed over are owned pageable
copies) and the
checkpoint tool (``lemon_ext.checkpoint.expand``: fetch from files, sink into shard writers).
This module imports torch, ``lemon_ext.errors`` and ``lemon_ext.ops`` (``prepare_maps``; specs
bring their kernels from there too) and never imports the engine or the checkpoint tool; its own
errors are ``LemonError``. Errors raised by
``fetch_source``, ``spec.execute`` or ``sink`` reach the caller unchanged.
"""
from __future__ import annotations

import inspect
import math
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
    GPU: the tests swap in a stand-in whose copies and kernels run only when an event recorded
    after them is waited on (a missing wait or a buffer reused too early then shows as wrong
    bytes, a wait in the wrong thread as a stall)."""

    @staticmethod
    def new_stream(dev):
        return torch.cuda.Stream(dev)

    @staticmethod
    def new_event(timing: bool = False):
        return torch.cuda.Event(enable_timing=timing)

    @staticmethod
    def use_stream(stream):
        return torch.cuda.stream(stream)

    @staticmethod
    def current_stream(dev):
        """The caller's stream (where device results will be consumed)."""
        return torch.cuda.current_stream(dev)

    @staticmethod
    def pinned(nbytes: int) -> torch.Tensor:
        """A uint8 host buffer of ``nbytes`` rounded up to a page, page-locked with cudaHostRegister
        (the caching host allocator behind ``pin_memory=True`` would round it up to a power of two
        and keep it cached). The registered range is page-aligned inside its own allocation, so
        no other allocation shares its pages."""
        page = _PAGE
        size = max(page, -(-nbytes // page) * page)
        raw = torch.empty(size + page, dtype=torch.uint8)
        off = (-raw.data_ptr()) % page
        t = raw[off:off + size]
        # flag 1 = cudaHostRegisterPortable (as torch.cuda._pin_memory_utils, which torch's own
        # checkpoint stager uses for the same purpose)
        rc = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), size, 1))
        if rc != 0:
            raise RuntimeError(f"cudaHostRegister of {size} bytes failed (cudaError {rc})")
        return t

    @staticmethod
    def unpin(t: torch.Tensor) -> None:
        rc = int(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))
        if rc != 0:
            raise RuntimeError(f"cudaHostUnregister failed (cudaError {rc})")

    @staticmethod
    def pinned_tensor(shape, dtype) -> torch.Tensor:
        """A fresh page-locked tensor from the caching host allocator (``_PINNED_RESULTS`` only)."""
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
    def launch(fn, shape, dtype) -> torch.Tensor:
        """Queue ``fn`` (the kernel; it returns its output of ``shape`` / ``dtype``) on the current
        stream. The stand-in defers it like a kernel that has not run yet."""
        return fn()

    @staticmethod
    def keep_until_done(t: torch.Tensor, stream) -> None:
        """Tell the caching allocator ``t`` is in use on ``stream`` (allocated on another one)."""
        t.record_stream(stream)

    @staticmethod
    def elapsed(start, end) -> float:
        """Seconds between two completed timing events."""
        return start.elapsed_time(end) / 1e3


_PAGE = 4096
# Measurement knob (benchmarks/bench_pipeline_gpu.py --compare-pinned-results): with copy_out=True,
# copy each result into a fresh page-locked tensor that the caller keeps (the earlier design: a
# 12 GB target ends up page-locked) instead of the reused buffers + a pageable copy.
_PINNED_RESULTS = False
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
            during the call (the checkpoint writer copies it to disk at once); with
            ``copy_out=True`` an owned pageable host tensor (copied from that buffer by the
            writer thread); with ``output_device`` cuda a device tensor, ready on the caller's
            current stream and safe to keep.
        dtype: output dtype: None (the source's), one dtype, or {target name: dtype}.
        device: "auto" | "cpu" | "cuda" | "cuda:N" | torch.device where kernels run.
        output_device: where results are handed to the sink ("cpu", or the compute device to
            keep them there; only meaningful with a CUDA device).
        source_dtypes: {source name: dtype}; with a ``fetch_source`` accepting ``out=`` the CUDA
            path then reads each source straight into a pinned buffer (no pageable bounce).
    Returns:
        stage times in seconds (stages overlap, so the largest one bounds the wall time: that is
        the bottleneck to report). CPU path: {"read", "compute", "sink", "wall"}. CUDA path:
        {"read" (fetch into pinned buffers), "h2d", "compute" (the compute stream's time per
        tensor), "d2h" (device time, summed over tensors, from CUDA events), "host_copy" (pinned
        -> pageable, ``copy_out=True``), "sink", "wall"} and "pinned_bytes" (page-locked host
        memory held, ``pinned_plan``).
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


class _Buf:
    """A page-locked host buffer and the event of the last device copy that uses it (or None)."""

    __slots__ = ("t", "ready")

    def __init__(self, t: torch.Tensor):
        self.t, self.ready = t, None

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """The buffer's first bytes as a tensor of ``shape`` and ``dtype`` (no copy)."""
        return self.t[:_nbytes(tuple(shape), dtype)].view(dtype).view(shape)


class _PinnedPool:
    """A free-list of page-locked host buffers of one size. ``take`` waits (in the calling thread)
    for the buffer's last copy before handing it out and grows it when a tensor needs more than
    the planned size (a dtype the caller did not announce); ``give`` returns it with the event of
    the copy now using it, without waiting."""

    def __init__(self, cu, count: int, nbytes: int):
        self.cu, self.free, self.lock = cu, queue.Queue(), threading.Lock()
        self.bufs: list[_Buf] = []
        self.peak = 0
        for _ in range(count):
            self.free.put(self._new(nbytes))

    def _new(self, nbytes: int) -> _Buf:
        buf = _Buf(self.cu.pinned(nbytes))
        with self.lock:
            self.bufs.append(buf)
            self.peak = max(self.peak, self.nbytes)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(b.t.numel() for b in self.bufs)

    def take(self, need: int, abort: threading.Event) -> _Buf:
        buf = _get(self.free, abort)
        if buf.ready is not None:
            buf.ready.synchronize()
            buf.ready = None
        if buf.t.numel() < need:
            with self.lock:
                self.bufs.remove(buf)
            self.cu.unpin(buf.t)
            buf = self._new(need)
        return buf

    def give(self, buf: _Buf, ready=None) -> None:
        buf.ready = ready
        self.free.put(buf)

    def close(self) -> None:
        with self.lock:
            bufs, self.bufs = self.bufs, []
        for b in bufs:
            self.cu.unpin(b.t)


def _out_dtype(spec, dtype, source_dtypes) -> torch.dtype | None:
    """The dtype ``spec.execute`` will return (``_execute``'s rule), None when it cannot be known."""
    d = dtype.get(spec.name) if isinstance(dtype, dict) else dtype
    if d is not None:
        return d
    if spec.source is None:
        return torch.float32 if getattr(spec, "fill", None) is not None else None
    return source_dtypes.get(spec.source)


def pinned_plan(specs, *, dtype=None, source_dtypes=None, prefetch: int = 1, max_live_targets: int = 2,
                host_targets: bool = True) -> dict:
    """The page-locked host memory ``run_specs`` on CUDA takes for these specs, planned from the
    dtypes (tensors of unknown dtype are planned at 4 bytes per element and their buffer grows if
    needed): {"source_buffers", "source_bytes", "target_buffers", "target_bytes", "total"} with
    the per-buffer sizes rounded up to a page, as allocated."""
    source_dtypes = source_dtypes or {}
    src = tgt = 0
    for s in specs:
        if s.source is not None:
            src = max(src, _nbytes(s.source_shape, source_dtypes.get(s.source, torch.float32)))
        elif getattr(s, "fill", None) is not None:
            src = max(src, _nbytes(s.source_shape, _out_dtype(s, dtype, source_dtypes)))
        tgt = max(tgt, _nbytes(s.target_shape, _out_dtype(s, dtype, source_dtypes) or torch.float32))
    page = lambda n: max(_PAGE, -(-n // _PAGE) * _PAGE)  # noqa: E731
    n_src, n_tgt = max(1, prefetch) + 1, (max(1, max_live_targets) if host_targets else 0)
    plan = {"source_buffers": n_src, "source_bytes": page(src), "target_buffers": n_tgt, "target_bytes": page(tgt)}
    plan["total"] = n_src * plan["source_bytes"] + n_tgt * plan["target_bytes"]
    return plan


def _run_cuda(specs, fetch_source, sink, dev, *, seed, dtype, backend, prefetch, max_live_targets,
              copy_out, output_device, source_dtypes):
    """CUDA pipeline: pinned staging + three CUDA streams + reader/writer threads (see module doc).
    The main thread (this one) only queues copies and kernels; the reader and the writer are the
    threads that wait for device events."""
    from .. import ops

    cu = _cuda_calls
    abort = threading.Event()
    t_start = time.perf_counter()
    consumer = cu.current_stream(dev)
    h2d, comp, d2h = (cu.new_stream(dev) for _ in range(3))
    accepts_out = _fetch_accepts_out(fetch_source)
    keep_on_device = output_device.type == "cuda"
    pinned_results = copy_out and not keep_on_device and _PINNED_RESULTS
    plan = pinned_plan(specs, dtype=dtype, source_dtypes=source_dtypes, prefetch=prefetch,
                       max_live_targets=max_live_targets, host_targets=not keep_on_device and not pinned_results)
    stats = {"read": 0.0, "h2d": 0.0, "compute": 0.0, "d2h": 0.0, "host_copy": 0.0, "sink": 0.0, "wall": 0.0}
    pools: list[_PinnedPool] = []
    live = threading.Semaphore(max(1, max_live_targets))
    q_in: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    q_out: queue.Queue = queue.Queue()

    def read():
        for spec in specs:
            if getattr(spec, "row_map", None) is not None and spec.row_map.device.type == "cpu":
                ops.prepare_maps(spec.row_map, spec.col_map)  # host digest, off the main thread
            fill = getattr(spec, "fill", None)
            if spec.source is None and fill is None:
                _put(q_in, (spec, None, None), abort)  # spec.execute names the missing tensor
                continue
            shape = tuple(spec.source_shape)
            sdt = source_dtypes.get(spec.source) if spec.source is not None else _out_dtype(spec, dtype, {})
            if spec.source is None:  # a constant (Post-LN identity norm): built in the pinned buffer
                buf = src_pool.take(_nbytes(shape, sdt), abort)
                t0 = time.perf_counter()
                view = buf.view(shape, sdt)
                view.fill_(fill)
            elif accepts_out and sdt is not None:
                buf = src_pool.take(_nbytes(shape, sdt), abort)  # waits for the copy that last read it
                t0 = time.perf_counter()
                view = buf.view(shape, sdt)
                fetch_source(spec.source, out=view)
            else:
                t0 = time.perf_counter()
                t = fetch_source(spec.source)
                need = t.numel() * t.element_size()
                t1 = time.perf_counter()
                buf = src_pool.take(need, abort)
                t0 += time.perf_counter() - t1  # not the wait for a free buffer
                view = buf.view(t.shape, t.dtype)
                view.copy_(t)
                del t
            stats["read"] += time.perf_counter() - t0
            _put(q_in, (spec, view, buf), abort)
        _put(q_in, _STOP, abort)

    def write():
        while True:
            item = _get(q_out, abort)
            if item is _STOP:
                return
            spec, t, ev_done, tbuf, evs = item
            item = None
            ev_done.synchronize()
            for key, (e0, e1) in evs.items():
                stats[key] += cu.elapsed(e0, e1)
            if keep_on_device:
                # made on the private compute stream: order the caller's stream after the kernel and
                # keep the allocator from reusing the memory while the caller's stream reads it
                consumer.wait_event(ev_done)
                cu.keep_until_done(t, consumer)
            elif copy_out and tbuf is not None:
                t0 = time.perf_counter()
                owned = torch.empty(t.shape, dtype=t.dtype)
                owned.copy_(t)
                stats["host_copy"] += time.perf_counter() - t0
                t = owned
                tgt_pool.give(tbuf)
                tbuf = None
            t0 = time.perf_counter()
            sink(spec, t)
            stats["sink"] += time.perf_counter() - t0
            del t
            if tbuf is not None:
                tgt_pool.give(tbuf)
            live.release()

    reader = _Stage("lemon-read", read, abort)
    writer = _Stage("lemon-write", write, abort)
    try:
        src_pool = _PinnedPool(cu, plan["source_buffers"], plan["source_bytes"])
        pools.append(src_pool)
        tgt_pool = _PinnedPool(cu, plan["target_buffers"], plan["target_bytes"])
        pools.append(tgt_pool)
        reader.start()
        writer.start()
        while True:
            item = _get(q_in, abort)
            if item is _STOP:
                break
            spec, host, buf = item
            item = None
            evs = {}
            src_dev = None
            if host is not None:
                with cu.use_stream(h2d):
                    e0 = cu.new_event(True)
                    e0.record(h2d)
                    src_dev = cu.to_device(host, dev)
                    ev_h2d = cu.new_event(True)
                    ev_h2d.record(h2d)
                evs["h2d"] = (e0, ev_h2d)
                src_pool.give(buf, ev_h2d)  # the reader waits for this copy before refilling it
                comp.wait_event(ev_h2d)
                cu.keep_until_done(src_dev, comp)  # allocated on h2d, used on comp
            del host, buf
            _acquire(live, abort)
            out_dtype = _out_dtype(spec, dtype, source_dtypes) or (src_dev.dtype if src_dev is not None else None)
            with cu.use_stream(comp):
                k0 = cu.new_event(True)
                k0.record(comp)
                out = cu.launch(lambda spec=spec, src=src_dev: _execute(spec, src, seed=seed, dtype=dtype, device=dev,
                                                                        backend=backend),
                                tuple(spec.target_shape), out_dtype)
                ev_k = cu.new_event(True)
                ev_k.record(comp)
            evs["compute"] = (k0, ev_k)
            del src_dev
            if keep_on_device:
                q_out.put((spec, out, ev_k, None, evs))
                del out
                continue
            need = out.numel() * out.element_size()
            tbuf = None if pinned_results else tgt_pool.take(need, abort)  # waits for the writer only
            d2h.wait_event(ev_k)
            with cu.use_stream(d2h):
                d0 = cu.new_event(True)
                d0.record(d2h)
                if tbuf is None:
                    host_out = cu.pinned_tensor(out.shape, out.dtype)
                else:
                    host_out = tbuf.view(out.shape, out.dtype)
                cu.copy_to_host(host_out, out)
                cu.keep_until_done(out, d2h)
                ev_out = cu.new_event(True)
                ev_out.record(d2h)
            evs["d2h"] = (d0, ev_out)
            del out
            q_out.put((spec, host_out, ev_out, tbuf, evs))
            del host_out, tbuf
        q_out.put(_STOP)
    except _Abort:
        pass
    except BaseException:
        abort.set()
        raise
    finally:
        if writer.ident and not abort.is_set():
            writer.join()
        abort.set()  # release a reader blocked on a full queue
        for st in (reader, writer):
            if st.ident:
                st.join()
        try:  # no copy may still be reading or writing a buffer we unpin
            for st in (h2d, comp, d2h):
                st.synchronize()
        finally:
            stats["pinned_bytes"] = sum(p.peak for p in pools)
            for p in pools:
                p.close()
    for st in (reader, writer):
        if st.error is not None:
            raise st.error
    stats["wall"] = time.perf_counter() - t_start
    return stats


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize
