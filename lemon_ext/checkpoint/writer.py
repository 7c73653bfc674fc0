"""Stream one safetensors shard to disk, tensor by tensor, hashing as it goes.

The header is written first (the shard's layout is planned), then each tensor's bytes straight
from the tensor's memory (a numpy view, no copy). The file is ``<name>.partial`` until every
tensor is in and it has been fsynced; then it is renamed, so a file with a shard's final name is
always complete. Any OSError (ENOSPC: disk full) removes the partial file and becomes one
CheckpointError line naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import os

import torch

from .errors import CheckpointError
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
    returns ``(sha256 hex, size in bytes)`` and renames the file into place; ``abort()`` removes it.
    """

    def __init__(self, directory: str, shard: Shard, metadata: dict | None = None, fsync: bool = True):
        self.shard = shard
        self.path = os.path.join(directory, shard.filename)
        self.partial = self.path + ".partial"
        self.fsync = fsync
        self._next = 0
        self._sha = hashlib.sha256()
        self._size = 0
        self._f = None
        try:
            self._f = open(self.partial, "wb")
            self._emit(build_header(shard.tensors, metadata if metadata is not None else ST_METADATA))
        except OSError as e:
            self.abort()
            raise CheckpointError(os_error_line(self.path, e)) from None

    def _emit(self, buf) -> None:
        # Write before hashing: if the write fails the hash is moot. Both release the GIL.
        self._f.write(buf)
        self._sha.update(buf)
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
        """Flush, fsync, rename into place; return (sha256 hex digest, file size)."""
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
        return self._sha.hexdigest(), self._size

    def abort(self) -> None:
        """Close and delete the partial file (frees the space a full disk needs back)."""
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


def sha256_file(path: str, chunk: int = 16 << 20) -> str:
    """sha256 of a file, read in 16 MiB chunks (bounded memory)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()
