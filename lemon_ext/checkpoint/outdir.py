"""The output directory, made atomically: built under a hidden name beside DST, renamed when complete.

``DST/../.<name>.lemon-partial/`` holds the run in progress, with ``.lemon-progress/<shard>.json``
recording each finished shard's digest, the digest's algorithm and the run's fingerprint (plan,
seed, dtype, source): ``{"fingerprint", "hash": {"algorithm", "digest"}, "size"}``. A crash leaves
only that hidden directory, never a directory named DST; ``--resume`` reuses the shards whose
record matches the fingerprint and whose file, re-hashed with the record's own algorithm, still
has the recorded digest. A record without ``"hash"`` (written before the hash was a choice) holds
``"sha256"`` and is checked with sha256.

One run per DST: ``lock`` holds ``flock`` on ``DST/../.<name>.lemon-lock`` from before the hidden
directory is prepared (or deleted) until after the rename, so a second run into the same DST stops
at once instead of deleting the first one's directory. ``commit`` checks every shard's presence and
size against the record before renaming, so a directory changed under the run never becomes DST.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil

from .errors import CheckpointError
from .hashing import DEFAULT_ALGORITHM, SHA256, file_digests
from .writer import os_error_line

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
        self.lockfile = os.path.join(parent, f".{name}.lemon-lock")
        self.progress = os.path.join(self.tmp, PROGRESS)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Hold an exclusive lock on DST for this run (rank 0, before ``prepare``); never waits.

        The lock file sits beside DST, not in the hidden directory that ``prepare`` may delete.
        Only the kernel's flock counts, not the file's existence: a crashed run's lock is released
        with its process, so a leftover file blocks nothing.
        """
        if self._lock_fd is not None:
            return
        while True:
            try:
                fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CheckpointError(os_error_line(self.lockfile, e)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(
                        f"{self.dst}: another lemon-expand run holds this output (lock {self.lockfile}); "
                        f"wait for it or choose another DST") from None
                raise CheckpointError(os_error_line(self.lockfile, e)) from None
            # The holder unlinks the file before releasing it (see unlock): if we locked a file
            # that is no longer at the path, a newer run may hold the one that is; try again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lockfile))
            except OSError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def unlock(self) -> None:
        """Release the lock. The file is removed first, while still held, so no lock file is left
        beside DST after a run that ends (a crash leaves one, harmlessly); ``lock``'s inode check
        makes this safe against a run that opened the old file just before."""
        if self._lock_fd is None:
            return
        try:
            os.remove(self.lockfile)
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

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

    def record(self, filename: str, fingerprint: str, digest: str, size: int, *, algorithm: str) -> None:
        """Note a finished (fsynced) shard: its ``algorithm`` hex ``digest`` and size, for resume."""
        write_json_atomic(os.path.join(self.progress, filename + ".json"),
                          {"fingerprint": fingerprint, "hash": {"algorithm": algorithm, "digest": digest},
                           "size": size})

    def resumable(self, filename: str, fingerprint: str, algorithm: str = DEFAULT_ALGORITHM) -> dict | None:
        """``{"algorithm", "digest", "size"}`` of a finished shard that can be kept (same plan, same
        bytes), the digest in ``algorithm``; else None.

        The file is re-hashed with the record's own algorithm and must give the recorded digest.
        When that is not ``algorithm`` (a run resumed with another ``--hash``), the same read also
        computes the digest in ``algorithm``, so every shard of a report carries the one asked for.
        """
        rec_path = os.path.join(self.progress, filename + ".json")
        path = os.path.join(self.tmp, filename)
        try:
            with open(rec_path, encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("fingerprint") != fingerprint or os.path.getsize(path) != rec.get("size"):
                return None
            recorded_algorithm, recorded_digest = _recorded_hash(rec)
            digests = file_digests(path, {recorded_algorithm, algorithm})
            if digests[recorded_algorithm] != recorded_digest:
                return None
            return {"algorithm": algorithm, "digest": digests[algorithm], "size": rec["size"]}
        except (OSError, ValueError, TypeError, AttributeError, KeyError, CheckpointError):
            # unreadable or malformed record, or an algorithm this version does not know: rebuild
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

    def check_complete(self, sizes: dict, index: str | None = None) -> None:
        """Every planned file ``{name: size}`` is in the hidden directory with its recorded size,
        and ``index`` (a file in it, or None for no index) names exactly those files. Presence and
        size only, no re-hash of GBs: this catches a directory deleted or replaced under the run,
        so an incomplete directory is never renamed to DST."""
        keep = f"output not renamed; the partial output stays in {self.tmp}"
        for name, size in sizes.items():
            try:
                got = os.path.getsize(self.path(name))
            except OSError:
                raise CheckpointError(f"{self.path(name)}: shard missing before the final rename ({keep})") from None
            if got != size:
                raise CheckpointError(f"{self.path(name)}: shard has {got} bytes on disk, {size} were written ({keep})")
        if index is None:
            return
        try:
            with open(self.path(index), encoding="utf-8") as f:
                listed = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{self.path(index)}: index unreadable before the final rename ({keep})") from None
        if listed != set(sizes):
            odd = sorted(listed ^ set(sizes))[0]
            raise CheckpointError(f"{self.path(index)}: index and written shards disagree on '{odd}' ({keep})")

    def commit(self, sizes: dict | None = None, index: str | None = None) -> None:
        """Move the finished directory to DST (replacing an old DST only with overwrite), after
        ``check_complete(sizes, index)`` when ``sizes`` is given."""
        if sizes is not None:
            self.check_complete(sizes, index)
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


def _recorded_hash(rec: dict) -> tuple[str, str]:
    """(algorithm, digest) of a resume record; a record without ``"hash"`` is an older sha256 one."""
    if "hash" not in rec:
        return SHA256, rec["sha256"]
    return rec["hash"]["algorithm"], rec["hash"]["digest"]


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
