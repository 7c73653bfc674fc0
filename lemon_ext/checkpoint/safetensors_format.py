"""The safetensors file format, read and written without the ``safetensors`` package's mmap.

Layout: an 8-byte little-endian header length N, N bytes of JSON
(``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``, padded
with spaces to a multiple of 8), then the tensor bytes back to back, offsets relative to 8 + N.

Why our own reader: ``safe_open`` maps the whole file, and the file pages a read touches stay
resident (and count in the process RSS) as long as the file is open; streaming a 20 GB checkpoint
through one ``safe_open`` handle grew RSS towards the file size. ``os.preadv`` into a fresh buffer
keeps RSS at the size of the tensors alive. Tests check that both readers give the same bytes.

Why our own writer: the header can be written before any tensor exists (shapes are planned), so a
shard streams to disk tensor by tensor and never sits whole in memory. The byte layout is the one
``safetensors.torch.save`` produces (tensors ordered by dtype descending, then name; compact JSON;
space padding), checked byte for byte by a test, so an output written by us equals one written by
``save_pretrained``'s writer.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from .errors import CheckpointError

# safetensors' Rust ``Dtype`` enum in declaration order: ``save`` sorts tensors by this, descending.
_DTYPE_ORDER = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]
DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}

TORCH_TO_ST = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.complex64: "C64",
}
for _name, _st in [("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"),
                   ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")]:
    if hasattr(torch, _name):
        TORCH_TO_ST[getattr(torch, _name)] = _st
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: name, torch dtype, shape, absolute byte range in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple
    begin: int  # absolute file offset of the first byte
    end: int    # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> tuple[dict, dict[str, TensorEntry]]:
    """Parse and validate a safetensors header; read no tensor data.

    Returns (metadata dict, {name: TensorEntry}). Raises CheckpointError naming ``path`` for a
    truncated file, an unreadable header, an unknown dtype, a byte range that disagrees with the
    shape, overlapping tensors, or data missing at the end of the file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                    f"file of {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype = ST_TO_TORCH[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if any(s < 0 for s in shape) or b < 0 or e < b:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'")
        if e - b != math.prod(shape) * dtype_size(dtype):
            raise CheckpointError(
                f"{path}: tensor '{name}' has {e - b} bytes but shape {list(shape)} "
                f"{info['dtype']} needs {math.prod(shape) * dtype_size(dtype)}")
        entries[name] = TensorEntry(name, dtype, shape, data_start + b, data_start + e)
    # Byte ranges must tile the data region: overlaps mean corruption, a short file truncation.
    end = data_start
    for ent in sorted(entries.values(), key=lambda t: (t.begin, t.end)):
        if ent.begin < end:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor '{ent.name}' overlaps another)")
        end = ent.end
    if end > size:
        last = max(entries.values(), key=lambda t: t.end)
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor '{last.name}' ends at byte {last.end}, "
            f"file has {size} bytes")
    return meta, entries


def read_tensor(fd: int, entry: TensorEntry, path: str = "") -> torch.Tensor:
    """Read one tensor with ``os.preadv`` into a fresh CPU tensor (thread-safe: no shared seek)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    read_into(fd, entry, out, path)
    return out


def read_into(fd: int, entry: TensorEntry, out: torch.Tensor, path: str = "") -> torch.Tensor:
    """Read one tensor's bytes into ``out`` (contiguous CPU tensor, possibly pinned, right size)."""
    if entry.nbytes == 0:
        return out
    buf = memoryview(tensor_bytes(out))
    pos = 0
    while pos < entry.nbytes:
        try:
            got = os.preadv(fd, [buf[pos:]], entry.begin + pos)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read tensor '{entry.name}': {e.strerror or e}") from None
        if got <= 0:
            raise CheckpointError(f"{path}: truncated safetensors file while reading tensor '{entry.name}'")
        pos += got
    return out


def tensor_bytes(t: torch.Tensor):
    """A numpy uint8 view of a contiguous CPU tensor's bytes (no copy), usable as a buffer."""
    return t.reshape(-1).view(torch.uint8).numpy()


def file_order(entries: list[tuple[str, torch.dtype, tuple]]) -> list[tuple[str, torch.dtype, tuple]]:
    """The order ``safetensors.torch.save`` lays tensors out in: dtype descending, then name."""
    return sorted(entries, key=lambda e: (-DTYPE_RANK[TORCH_TO_ST[e[1]]], e[0]))


def build_header(entries: list[tuple[str, torch.dtype, tuple]], metadata: dict | None) -> bytes:
    """The 8-byte length + JSON header for tensors already in file order (see :func:`file_order`)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape in entries:
        nb = math.prod(shape) * dtype_size(dtype)
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw
