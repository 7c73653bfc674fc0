"""Read a Hugging Face model directory tensor by tensor: the only module that opens source weights.

Formats: ``model.safetensors``; sharded safetensors with ``model.safetensors.index.json``;
``pytorch_model.bin`` or sharded ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json``.
Everything is validated from headers before a weight is read (so ``--dry-run`` can report every
problem): truncated or corrupt files, an index naming a missing file, a tensor the index lists but
its file lacks (or the reverse).

``.bin`` files are loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling) and
``mmap=True`` (zip format since torch 1.6), so tensors are paged in lazily; files over 256 MiB are
unmapped after each read so their pages do not pile up in RSS. A legacy non-zip file cannot be
mapped and is loaded whole (a log line says so; the memory bound then includes that file).
The source is opened read-only.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import threading
from collections import OrderedDict

import torch

from .errors import CheckpointError
from .safetensors_format import TensorEntry, read_header, read_into, read_tensor

log = logging.getLogger("lemon_ext.checkpoint")

ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_UNMAP_BYTES = 256 << 20


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: unreadable {what} (not a JSON object)")
    return data


#: Terminal escape sequences (torch's messages bold some words): CSI sequences and 2-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")
#: The refused global in torch's weights_only messages: "GLOBAL posix.system whose module ...",
#: "Unsupported global: GLOBAL pkg.Cls was not an allowed global", older "Unsupported class pkg.Cls".
_REFUSED_GLOBAL = re.compile(r"(?:\bGLOBAL|Unsupported class)\s+([A-Za-z_][\w.]*\w)")


def _load_error_line(fpath: str, e: Exception) -> str:
    """One plain line for a failed torch.load: the refused global when the weights-only unpickler
    names one (torch's own text is many lines, with bold escapes and advice to drop weights_only),
    else the unpickler's reason (or the error's first line) without escapes, shortened at a word."""
    text = _ANSI.sub("", str(e))
    m = _REFUSED_GLOBAL.search(text) if isinstance(e, pickle.UnpicklingError) else None
    if m:
        return (f"{fpath}: refused to unpickle global '{m.group(1)}' (weights_only=True loads tensors only; "
                f"if you trust the file, re-save it as a plain dict of tensors or as safetensors)")
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
    detail = lines[0]
    # torch's first line is generic advice; the unpickler's own reason follows this tag
    tagged = [i for i, ln in enumerate(lines) if "WeightsUnpickler error:" in ln]
    if tagged:
        rest = lines[tagged[0]].split("WeightsUnpickler error:", 1)[1].strip()
        detail = rest or (lines[tagged[0] + 1] if tagged[0] + 1 < len(lines) else detail)
    if len(detail) > 300:
        detail = detail[:300].rsplit(" ", 1)[0] + " ..."
    return f"{fpath}: cannot load PyTorch weights ({detail})"


class SourceCheckpoint:
    """A validated source model directory.

    Attributes: ``path``, ``format`` ("safetensors" | "bin"), ``config`` (config.json as a dict),
    ``files`` (weight files, relative names, in index order), ``shapes`` ({name: shape}),
    ``dtypes`` ({name: torch.dtype}), ``weight_map`` ({name: file}).
    ``get(name)`` reads one tensor into fresh CPU memory; ``close()`` releases file handles.
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face model directory)")
        self.config = _load_json(os.path.join(self.path, "config.json"), "config.json")
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._bins: OrderedDict[str, dict] = OrderedDict()
        self._mapped: set[str] = set()  # .bin files loaded with mmap=True (zip format)
        self.entries: dict[str, TensorEntry] = {}
        self.weight_map: dict[str, str] = {}
        j = lambda n: os.path.join(self.path, n)  # noqa: E731
        if os.path.exists(j(ST_INDEX)):
            self.format = "safetensors"
            self._scan_index(ST_INDEX, self._scan_safetensors)
        elif os.path.exists(j(ST_SINGLE)):
            self.format = "safetensors"
            self._scan_safetensors(ST_SINGLE, None)
        elif os.path.exists(j(BIN_INDEX)):
            self.format = "bin"
            self._scan_index(BIN_INDEX, self._scan_bin)
        elif os.path.exists(j(BIN_SINGLE)):
            self.format = "bin"
            self._scan_bin(BIN_SINGLE, None)
        else:
            raise CheckpointError(
                f"{self.path}: no weights found (expected {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} "
                f"or {BIN_INDEX})")
        self.files = list(dict.fromkeys(self.weight_map.values()))
        self.shapes = {n: tuple(self._shape(n)) for n in self.weight_map}
        self.dtypes = {n: self._dtype(n) for n in self.weight_map}

    # -- scanning (headers only) ---------------------------------------------------------------
    def _scan_index(self, index_name: str, scan_file) -> None:
        ipath = os.path.join(self.path, index_name)
        index = _load_json(ipath, "index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{ipath}: index has no weight_map")
        by_file: dict[str, set] = {}
        for name, fname in wm.items():
            by_file.setdefault(fname, set()).add(name)
        for fname in by_file:
            if os.path.basename(fname) != fname:
                raise CheckpointError(f"{ipath}: index names a file outside the directory: '{fname}'")
            if not os.path.isfile(os.path.join(self.path, fname)):
                raise CheckpointError(f"{ipath}: index names missing file '{fname}'")
        for fname, names in by_file.items():
            scan_file(fname, names)

    def _check_listed(self, fname: str, found: set, listed: set | None) -> None:
        if listed is None:
            return
        fpath = os.path.join(self.path, fname)
        missing = sorted(listed - found)
        if missing:
            raise CheckpointError(f"{fpath}: tensor '{missing[0]}' is listed in the index but not in the file"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(found - listed)
        if extra:
            raise CheckpointError(f"{fpath}: tensor '{extra[0]}' is in the file but not listed in the index"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    def _scan_safetensors(self, fname: str, listed: set | None) -> None:
        fpath = os.path.join(self.path, fname)
        _, entries = read_header(fpath)
        self._check_listed(fname, set(entries), listed)
        for name, ent in entries.items():
            if name in self.weight_map:
                raise CheckpointError(f"{fpath}: tensor '{name}' also appears in '{self.weight_map[name]}'")
            self.entries[name] = ent
            self.weight_map[name] = fname

    def _scan_bin(self, fname: str, listed: set | None) -> None:
        sd = self._load_bin(fname)
        self._check_listed(fname, set(sd), listed)
        for name in sd:
            if name in self.weight_map:
                raise CheckpointError(
                    f"{os.path.join(self.path, fname)}: tensor '{name}' also appears in '{self.weight_map[name]}'")
            self.weight_map[name] = fname

    def _load_bin(self, fname: str) -> dict:
        """torch.load one .bin (weights only, memory-mapped when possible), cached 2 files deep."""
        if fname in self._bins:
            self._bins.move_to_end(fname)
            return self._bins[fname]
        fpath = os.path.join(self.path, fname)
        try:
            with open(fpath, "rb") as f:
                is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6
            if is_zip:
                sd = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
                self._mapped.add(fname)
            else:
                log.warning("%s: legacy (non-zip) format cannot be memory-mapped; loading it whole", fpath)
                sd = torch.load(fpath, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling/zip failure is a corrupt file
            raise CheckpointError(_load_error_line(fpath, e)) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise CheckpointError(f"{fpath}: not a state dict of tensors")
        self._bins[fname] = sd
        while len(self._bins) > 2:
            self._bins.popitem(last=False)
        return sd

    def _shape(self, name):
        if self.format == "safetensors":
            return self.entries[name].shape
        return self._load_bin(self.weight_map[name])[name].shape

    def _dtype(self, name):
        if self.format == "safetensors":
            return self.entries[name].dtype
        return self._load_bin(self.weight_map[name])[name].dtype

    # -- reading -------------------------------------------------------------------------------
    def nbytes(self, name: str) -> int:
        """Bytes of one source tensor (from the header)."""
        from math import prod
        return prod(self.shapes[name]) * torch.empty((), dtype=self.dtypes[name]).element_size()

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.weight_map)

    def _fd(self, fname: str) -> int:
        with self._lock:
            fd = self._fds.get(fname)
            if fd is None:
                fd = os.open(os.path.join(self.path, fname), os.O_RDONLY)
                self._fds[fname] = fd
            return fd

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` into fresh CPU memory (or into ``out``, e.g. a pinned buffer)."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor '{name}' in the source checkpoint")
        fname = self.weight_map[name]
        if self.format == "safetensors":
            ent = self.entries[name]
            fpath = os.path.join(self.path, fname)
            if out is None:
                return read_tensor(self._fd(fname), ent, fpath)
            return read_into(self._fd(fname), ent, out, fpath)
        with self._lock:
            t = self._load_bin(fname)[name]
            res = t.contiguous().clone() if out is None else out.copy_(t)
            del t
            if fname in self._mapped and os.path.getsize(os.path.join(self.path, fname)) > _UNMAP_BYTES:
                # The pages of a memory-mapped file stay resident (and count in RSS) while it is
                # mapped: unmap big files after each read; re-mapping costs one unpickling of the
                # file's index (~ms), far less than the tensor copy.
                self._bins.pop(fname, None)
        return res

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._bins.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
