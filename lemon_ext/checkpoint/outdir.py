"""The output directory, made atomically: built under a hidden name beside DST, renamed when complete.

``DST/../.<name>.lemon-partial/`` holds the run in progress, with ``.lemon-progress/<shard>.json``
recording each finished shard's sha256 and the run's fingerprint (plan, seed, dtype, source). A
crash leaves only that hidden directory, never a directory named DST; ``--resume`` reuses the
shards whose record matches the fingerprint and whose file still has the recorded sha256.
"""
from __future__ import annotations

import json
import os
import shutil

from .errors import CheckpointError
from .writer import os_error_line, sha256_file

MARKER = ".lemon-partial-marker"
PROGRESS = ".lemon-progress"


def _is_within(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def write_json_atomic(path: str, data, indent: int | None = 2) -> None:
    """Write JSON to ``path`` via a temporary file + rename (never a half-written file)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointError(os_error_line(path, e)) from None


class OutputDir:
    """DST and its temporary sibling; ``prepare`` on rank 0, ``commit`` on rank 0 after all shards."""

    def __init__(self, dst: str, src: str, *, overwrite: bool = False, resume: bool = False):
        self.dst = os.path.abspath(os.fspath(dst)).rstrip(os.sep)
        self.src = os.path.abspath(os.fspath(src))
        self.overwrite, self.resume = overwrite, resume
        parent, name = os.path.split(self.dst)
        self.tmp = os.path.join(parent, f".{name}.lemon-partial")
        self.old = os.path.join(parent, f".{name}.lemon-old")
        self.progress = os.path.join(self.tmp, PROGRESS)

    def check(self) -> None:
        """Refuse what would lose data: DST inside/equal to SRC (or the reverse), or DST existing."""
        if _is_within(self.dst, self.src) or _is_within(self.src, self.dst):
            raise CheckpointError(f"{self.dst}: output must not be the source directory, inside it, or contain it")
        if os.path.lexists(self.dst) and not self.overwrite:
            raise CheckpointError(f"{self.dst}: already exists (pass --overwrite to replace it)")
        if os.path.lexists(self.dst) and not os.path.isdir(self.dst):
            raise CheckpointError(f"{self.dst}: exists and is not a directory")
        parent = os.path.dirname(self.dst)
        if not os.path.isdir(parent):
            raise CheckpointError(f"{parent}: parent directory of the output does not exist")

    def prepare(self) -> None:
        """Create (or, with resume, keep) the temporary directory. Rank 0 only."""
        self.check()
        try:
            if os.path.isdir(self.tmp) and not self.resume:
                if not os.path.exists(os.path.join(self.tmp, MARKER)):
                    raise CheckpointError(f"{self.tmp}: exists and was not made by lemon-expand; remove it")
                shutil.rmtree(self.tmp)
            os.makedirs(self.progress, exist_ok=True)
            with open(os.path.join(self.tmp, MARKER), "w") as f:
                f.write("lemon-expand output in progress; renamed to its final name when complete\n")
        except OSError as e:
            raise CheckpointError(os_error_line(self.tmp, e)) from None

    def record(self, filename: str, fingerprint: str, sha256: str, size: int) -> None:
        write_json_atomic(os.path.join(self.progress, filename + ".json"),
                          {"fingerprint": fingerprint, "sha256": sha256, "size": size})

    def resumable(self, filename: str, fingerprint: str) -> dict | None:
        """The record of a finished shard that can be kept (same plan, same bytes), else None."""
        rec_path = os.path.join(self.progress, filename + ".json")
        path = os.path.join(self.tmp, filename)
        try:
            with open(rec_path, encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("fingerprint") != fingerprint or os.path.getsize(path) != rec.get("size"):
                return None
            if sha256_file(path) != rec.get("sha256"):
                return None
            return rec
        except (OSError, ValueError):
            return None

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def remove_stray(self, keep: set) -> None:
        """Delete files in the temporary directory that the plan does not produce (old shards)."""
        for name in os.listdir(self.tmp):
            full = os.path.join(self.tmp, name)
            if name in keep or name in (MARKER, PROGRESS) or not os.path.isfile(full):
                continue
            os.remove(full)

    def commit(self) -> None:
        """Move the finished directory to DST (replacing an old DST only with overwrite)."""
        try:
            shutil.rmtree(self.progress, ignore_errors=True)
            os.remove(os.path.join(self.tmp, MARKER))
            _fsync_dir(self.tmp)
            if os.path.lexists(self.dst):
                if not self.overwrite:
                    raise CheckpointError(f"{self.dst}: already exists (pass --overwrite to replace it)")
                if os.path.lexists(self.old):
                    shutil.rmtree(self.old)
                os.replace(self.dst, self.old)
                os.replace(self.tmp, self.dst)
                shutil.rmtree(self.old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.dst)
            _fsync_dir(os.path.dirname(self.dst))
        except OSError as e:
            raise CheckpointError(os_error_line(self.dst, e)) from None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
