"""The integrity hash of written shards: xxh3_128 by default, sha256 on request.

xxh3_128 (the ``xxhash`` package, a binding of the reference xxHash library) runs at 21-30 GB/s on
one core of the 2-core dev VM: ~0.1 s per 2 GB shard, so the writer hashes it inline. sha256 runs
at 1.7-1.8 GB/s there (SHA-NI; 0.28 GB/s on the VM of benchmarks/RESULTS.md): about a core-second
per 2 GB, on a machine where the expansion kernel and the write already share two cores. It stays
an option because it is the digest the Hugging Face Hub (Git LFS) shows for a file, so an output
can be compared with an upload without re-reading GBs.

Digests are lowercase hex (``hexdigest()`` of either library). An unknown algorithm name is a
:class:`CheckpointError` naming the choices.
"""
from __future__ import annotations

import hashlib

from .errors import CheckpointError

XXH3_128 = "xxh3_128"
SHA256 = "sha256"
#: Every name accepted by ``--hash`` / ``hash_algorithm=``; the first is the default.
ALGORITHMS = (XXH3_128, SHA256)
DEFAULT_ALGORITHM = XXH3_128
#: Algorithms slow enough that the writer hashes them in a helper thread beside the write (see
#: ``writer.ShardWriter``); the others are hashed inline, where a thread hop costs more than the hash.
HASHED_BESIDE_WRITE = frozenset({SHA256})
#: file_digests (and hash_file) read this much at a time: bounded memory, and large enough that reads run at disk speed.
CHUNK_BYTES = 16 << 20


def check_algorithm(algorithm: str) -> str:
    """``algorithm`` if it is one of :data:`ALGORITHMS`, else a one-line CheckpointError."""
    if algorithm not in ALGORITHMS:
        raise CheckpointError(f"hash algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    return algorithm


def new_hasher(algorithm: str):
    """A fresh hash object with ``.update(buffer)`` and ``.hexdigest()`` for ``algorithm``."""
    if check_algorithm(algorithm) == SHA256:
        return hashlib.sha256()
    # A runtime dependency (pyproject.toml), imported here so that an install made before it was
    # added gets a one-line way out instead of an ImportError on ``import lemon_ext.checkpoint``.
    try:
        import xxhash
    except ImportError:
        raise CheckpointError(f"hash algorithm {algorithm!r} needs the xxhash package: "
                              f"pip install xxhash, or choose {SHA256}") from None
    return xxhash.xxh3_128()


def file_digests(path: str, algorithms) -> dict[str, str]:
    """``{algorithm: hex digest}`` of the file at ``path`` for each of ``algorithms``, reading the
    file once in :data:`CHUNK_BYTES` chunks (bounded memory). Raises OSError as ``open`` does."""
    hashers = {a: new_hasher(a) for a in algorithms}
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                break
            for h in hashers.values():
                h.update(view[:n])
    return {a: h.hexdigest() for a, h in hashers.items()}


def hash_file(path: str, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Hex digest of the file at ``path`` with ``algorithm`` (bounded memory, 16 MiB chunks)."""
    return file_digests(path, [algorithm])[algorithm]
