"""A CPU stand-in for the CUDA calls of ``lemon_ext.execution.pipeline`` (``_CudaCalls``).

It makes asynchrony visible: every host-to-device and device-to-host copy is queued on its stream
and runs only when an event recorded after it is waited on (``Event.synchronize``, or a stream
that waits for it and is itself driven), as a copy engine might; fresh "pinned" and "device"
buffers are filled with 0xFF bytes (NaN in every float dtype). A missing wait, a copy outside any
stream, or a buffer handed back or read before its copy ran gives wrong bytes or an error.

Two modes. Eager (default): kernels run on the host when launched, so a stream waiting on an event
runs that event's work at once. Lazy (``lazy=True``): kernels are queued like copies (their output
is a 0xFF placeholder until they run), ``Stream.wait_event`` queues a wait, and nothing runs until
some thread waits on an event; the log records when each copy and kernel is issued and when it
runs, and ``drives_by_issuer`` counts device work run by the thread that issues it (a host sync in
the hot loop). With ``gate_kernels=N`` (N = number of source copies of the run), kernel k may run
only once the copy of source k+1 has been issued: a pipeline that waits for kernel k before
queuing that copy stalls and the run fails with that message.
"""
from __future__ import annotations

import contextlib
import threading
import time

import torch

PAGE = 4096
_COND = threading.Condition(threading.RLock())  # one lock for every fake stream and the log


class FakeStream:
    def __init__(self, calls: "FakeCudaCalls", name: str):
        self.calls, self.name, self.ops, self.done, self.busy = calls, name, [], 0, False

    def enqueue(self, fn, label=None) -> None:
        with _COND:
            self.ops.append((fn, label))

    def run_until(self, pos: int) -> None:
        with _COND:
            if self.done < pos and threading.current_thread() is self.calls.issuer:
                self.calls.drives_by_issuer += 1
            while self.done < pos:
                if self.busy:  # another thread is running this stream's next op: wait for it
                    _COND.wait()
                    continue
                self.busy = True
                fn, label = self.ops[self.done]
                try:
                    fn()
                finally:
                    self.done += 1
                    self.busy = False
                    _COND.notify_all()
                self.calls.deferred_runs += 1
                if label is not None:
                    self.calls.log.append(("run",) + label)

    def wait_event(self, event: "FakeEvent") -> None:
        if self.calls.lazy:
            self.enqueue(event.synchronize)  # runs when this stream reaches it
        else:
            event.synchronize()  # the next kernel runs eagerly on the host: its inputs must be there now

    def synchronize(self) -> None:
        with _COND:
            pos = len(self.ops)
        self.run_until(pos)


class FakeEvent:
    def __init__(self, timing: bool):
        self.stream, self.pos, self.timing, self.time = None, 0, timing, None

    def record(self, stream: FakeStream) -> None:
        with _COND:
            stream.enqueue(self._mark)
            self.stream, self.pos = stream, len(stream.ops)

    def _mark(self) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        assert self.stream is not None, "waiting on an event that was never recorded"
        self.stream.run_until(self.pos)

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.timing and end.timing, "elapsed_time needs timing events"
        assert self.time is not None and end.time is not None, "elapsed_time of an event that has not completed"
        return (end.time - self.time) * 1e3


def _poisoned(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t.reshape(-1).view(torch.uint8).fill_(0xFF)
    return t


class FakeCudaCalls:
    def __init__(self, lazy: bool = False, gate_kernels: int | None = None, gate_timeout: float = 20.0):
        self.lazy, self.gate_kernels, self.gate_timeout = lazy, gate_kernels, gate_timeout
        self.streams: list[FakeStream] = []
        self.local = threading.local()
        self.copies = {"h2d": 0, "d2h": 0, "kernel": 0}
        self.deferred_runs = 0
        self.drives_by_issuer = 0
        self.issuer: threading.Thread | None = None
        self.log: list[tuple] = []
        self.pinned_sizes: list[int] = []
        self.unpinned = 0
        self.pinned_results = 0
        self.kept: list[tuple[int, FakeStream]] = []
        self.launch_streams: list[FakeStream] = []
        self.consumer = FakeStream(self, "consumer")

    # -- streams and events
    def new_stream(self, dev):
        self.issuer = threading.current_thread()
        self.streams.append(FakeStream(self, ("h2d", "compute", "d2h")[len(self.streams) % 3]))
        return self.streams[-1]

    def new_event(self, timing: bool = False):
        return FakeEvent(timing)

    def current_stream(self, dev):
        return self.consumer

    @contextlib.contextmanager
    def use_stream(self, stream):
        prev = getattr(self.local, "stream", None)
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = prev

    def _current(self) -> FakeStream:
        stream = getattr(self.local, "stream", None)
        assert stream is not None, "a copy or kernel outside any stream (it would run on the default stream)"
        return stream

    # -- memory
    def pinned(self, nbytes: int) -> torch.Tensor:
        size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        self.pinned_sizes.append(size)
        return _poisoned((size,), torch.uint8)

    def unpin(self, t) -> None:
        self.unpinned += 1

    def pinned_tensor(self, shape, dtype) -> torch.Tensor:
        self.pinned_results += 1
        return _poisoned(shape, dtype)

    # -- work
    def to_device(self, host, dev):
        out = _poisoned(host.shape, host.dtype)
        with _COND:
            k = self.copies["h2d"]
            self._current().enqueue(lambda: out.copy_(host), ("h2d", k))  # reads the pinned buffer when it runs
            self.copies["h2d"] += 1
            self.log.append(("issue", "h2d", k))
            _COND.notify_all()
        return out

    def copy_to_host(self, dst, src) -> None:
        with _COND:
            k = self.copies["d2h"]
            self._current().enqueue(lambda: dst.copy_(src), ("d2h", k))
            self.copies["d2h"] += 1
            self.log.append(("issue", "d2h", k))

    def launch(self, fn, shape, dtype):
        stream = self._current()
        self.launch_streams.append(stream)
        with _COND:
            k = self.copies["kernel"]
            self.copies["kernel"] += 1
            self.log.append(("issue", "kernel", k))
        if not self.lazy:
            out = fn()
            self.log.append(("run", "kernel", k))
            return out
        out = _poisoned(shape, dtype)

        def run():
            self._gate(k)
            res = fn()
            assert res.shape == out.shape and res.dtype == out.dtype, (res.shape, res.dtype, out.shape, out.dtype)
            out.copy_(res)

        stream.enqueue(run, ("kernel", k))
        return out

    def _gate(self, k: int) -> None:
        if self.gate_kernels is None:
            return
        need = min(k + 2, self.gate_kernels)
        with _COND:
            if self.copies["h2d"] >= need:
                return
            if threading.current_thread() is self.issuer:
                raise AssertionError(f"the issuing thread waited for kernel {k} before queuing the copy of "
                                     f"tensor {k + 1}")
            deadline = time.monotonic() + self.gate_timeout
            while self.copies["h2d"] < need:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"kernel {k} had to complete before the copy of tensor {k + 1} was "
                                         "queued (the issuing thread is blocked on the device)")
                _COND.wait(left)

    def keep_until_done(self, t, stream) -> None:
        self.kept.append((id(t), stream))

    @staticmethod
    def elapsed(start, end) -> float:
        return start.elapsed_time(end) / 1e3

    def pending(self) -> int:
        return sum(len(s.ops) - s.done for s in self.streams)
