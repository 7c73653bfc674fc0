"""Stream one safetensors shard to disk, tensor by tensor, hashing as it goes.

The header is written first (the shard's layout is planned), then each tensor's bytes from the
tensor's memory (a numpy view), with O_DIRECT through an aligned staging buffer where the
filesystem takes it (``direct_io``: past the page cache, 3x faster on the dev VM, nothing left to
flush at fsync), else through the page cache. The integrity hash (``hashing``) sees the same
bytes. The default, xxh3_128, is hashed inline in the writer thread: ~0.1 s of a core per 2 GB,
too little for a hop to a helper thread per buffer to pay off. sha256 (``hash_algorithm="sha256"``)
runs in a helper thread while the same bytes are written (both release the GIL): measured on the
slower 2-core VM of benchmarks/RESULTS.md, 2 GB written + sha256-hashed + fsynced took 24-36 s one
after the other and 18-19 s side by side (sha256 alone runs at 0.28 GB/s there; the write alone
took 12 s). The file is ``<name>.partial`` until every tensor is in; then it is renamed, so a file
with a shard's final name holds every byte we wrote.
Durability is separate (``Syncer``): fsync runs in a background thread, so the pipeline keeps
writing the next shard meanwhile. Measured on the 2-core CI VM (disk ~40 MB/s sustained): an
fsync in the writer thread stalled the pipeline for ~50 s per 2 GB shard (benchmark 587 s vs 286 s
for safetensors writes). A shard's resume record is written only after its fsync, and resume
re-hashes the file anyway. Any OSError (ENOSPC: disk full) removes the partial file and becomes
one CheckpointError line naming the file.
"""
from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .direct_io import DirectFile
from .errors import CheckpointError
from .hashing import DEFAULT_ALGORITHM, HASHED_BESIDE_WRITE, new_hasher
from .safetensors_format import build_header, tensor_bytes
from .shards import Shard

#: safetensors metadata written by ``save_pretrained`` (transformers checks format == "pt").
ST_METADATA = {"format": "pt"}


def os_error_line(path: str, e: OSError) -> str:
    """One line for an OSError on ``path``; a full disk says so plainly."""
    if e.errno == errno.ENOSPC:
        return f"{path}: no space left on device while writing"
    if e.errno == errno.EDQUOT:
        return f"{path}: disk quota exceeded while writing"
    return f"{path}: write failed: {e.strerror or e}"


class ShardWriter:
    """Write the tensors of ``shard`` into ``directory``, in the shard's file order.

    ``write(name, tensor)`` must be called once per tensor in ``shard.tensors`` order; ``close()``
    returns ``(hex digest of the file with hash_algorithm, size in bytes)`` and renames the file into
    place; ``abort()`` removes it. ``hash_algorithm``: one of ``hashing.ALGORITHMS``.
    """

    def __init__(self, directory: str, shard: Shard, metadata: dict | None = None, fsync: bool = False,
                 hash_algorithm: str = DEFAULT_ALGORITHM, direct_io: bool = True):
        self.shard = shard
        self.path = os.path.join(directory, shard.filename)
        self.partial = self.path + ".partial"
        self.fsync = fsync
        self.hash_algorithm = hash_algorithm
        self._next = 0
        self._hash = new_hasher(hash_algorithm)  # an unknown name fails here, before a file exists
        self._hash_thread = (ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lemon-{hash_algorithm}")
                             if hash_algorithm in HASHED_BESIDE_WRITE else None)
        self._size = 0
        self._f = None
        try:
            # O_DIRECT where the filesystem takes it (direct_io.py: 3x faster here and nothing left
            # to fsync), else the page cache; the same bytes either way.
            self._f = DirectFile(self.partial) if direct_io else open(self.partial, "wb")
            self._emit(build_header(shard.tensors, metadata if metadata is not None else ST_METADATA))
        except OSError as e:
            self.abort()
            raise CheckpointError(os_error_line(self.path, e)) from None

    def _emit(self, buf) -> None:
        # Return only when the bytes are both hashed and written, so the caller may reuse the
        # buffer (the CUDA path hands over views of pinned staging buffers).
        if self._hash_thread is None:
            self._hash.update(buf)
            self._f.write(buf)
        else:  # a slow hash runs side by side with the write
            hashed = self._hash_thread.submit(self._hash.update, buf)
            try:
                self._f.write(buf)
            finally:
                hashed.result()
        self._size += len(buf) if isinstance(buf, bytes) else buf.nbytes

    @property
    def done(self) -> bool:
        return self._next == len(self.shard.tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name``'s bytes; it must be the next one in file order, shape and dtype."""
        if self._next >= len(self.shard.tensors):
            raise CheckpointError(f"{self.path}: unexpected tensor '{name}' (shard already complete)")
        ename, edtype, eshape = self.shard.tensors[self._next]
        if name != ename or tensor.dtype != edtype or tuple(tensor.shape) != tuple(eshape):
            raise CheckpointError(
                f"{self.path}: tensor '{name}' {tuple(tensor.shape)} {tensor.dtype} does not match the "
                f"planned '{ename}' {tuple(eshape)} {edtype}")
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        try:
            if tensor.numel():
                self._emit(tensor_bytes(tensor))
        except OSError as e:
            self.abort()
            raise CheckpointError(os_error_line(self.path, e)) from None
        self._next += 1

    def close(self) -> tuple[str, int]:
        """Flush (fsync only if asked), rename into place; return (hex digest, file size)."""
        if not self.done:
            missing = self.shard.tensors[self._next][0]
            self.abort()
            raise CheckpointError(f"{self.path}: tensor '{missing}' was never produced")
        try:
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self.partial, self.path)
        except OSError as e:
            self.abort()
            raise CheckpointError(os_error_line(self.path, e)) from None
        self._stop_hash_thread()
        return self._hash.hexdigest(), self._size

    def _stop_hash_thread(self) -> None:
        if self._hash_thread is not None:
            self._hash_thread.shutdown()

    def abort(self) -> None:
        """Close and delete the partial file (frees the space a full disk needs back)."""
        self._stop_hash_thread()
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        try:
            os.remove(self.partial)
        except OSError:
            pass


class Syncer:
    """fsync finished files in a background thread, in order, then call ``done(path, *info)``.

    ``submit`` never blocks the caller; ``join`` waits for every fsync and raises the first error
    (one CheckpointError line naming the file: a full disk can surface only at fsync).
    """

    def __init__(self, done=None):
        import queue
        import threading

        self._q: queue.Queue = queue.Queue()
        self._done = done
        self.error: Exception | None = None
        self._t = threading.Thread(target=self._run, name="lemon-fsync", daemon=True)
        self._t.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            path, info = item
            if self.error is not None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if self._done is not None:
                    self._done(path, *info)
            except OSError as e:
                self.error = CheckpointError(os_error_line(path, e))
            except Exception as e:  # noqa: BLE001 - reported by join()
                self.error = e

    def submit(self, path: str, *info) -> None:
        self._q.put((path, info))

    def join(self) -> None:
        self._q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error
