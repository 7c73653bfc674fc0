"""Checkpoint I/O without the engine: safetensors headers, readers, shard plan, writer, output dir,
pipeline. Fast (no transformers models, no subprocesses)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from lemon_ext.checkpoint.device import resolve_device
from lemon_ext.checkpoint.errors import CheckpointError
from lemon_ext.checkpoint.hashing import ALGORITHMS, hash_file, new_hasher
from lemon_ext.checkpoint.outdir import OutputDir
from lemon_ext.checkpoint.safetensors_format import build_header, file_order, read_header, read_tensor
from lemon_ext.checkpoint.shards import build_index, parse_size, plan_shards, shards_for_rank
from lemon_ext.checkpoint.source import SourceCheckpoint
from lemon_ext.checkpoint.writer import ShardWriter
from lemon_ext.errors import LemonError
from lemon_ext.execution import pipeline

MIXED = {
    "b.weight": torch.arange(15, dtype=torch.float32).reshape(3, 5).to(torch.bfloat16),
    "a.weight": torch.tensor([1.5, -2.0]),
    "c": torch.tensor([7], dtype=torch.int64),
    "a2": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16),
    "z": torch.zeros(0, 4),
    "m": torch.tensor([True, False]),
    "d": torch.tensor([3.25], dtype=torch.float64),
    "i": torch.tensor([1, 2], dtype=torch.int32),
    "u": torch.tensor([9], dtype=torch.uint8),
}


def _entries(sd):
    return [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def test_writer_bytes_equal_safetensors_save(tmp_path):
    """Our streaming writer lays a file out byte for byte like safetensors.torch.save."""
    from lemon_ext.checkpoint.shards import Shard

    shard = Shard(0, "x.safetensors", file_order(_entries(MIXED)))
    w = ShardWriter(str(tmp_path), shard)
    for name, _, _ in shard.tensors:
        w.write(name, MIXED[name])
    digest, size = w.close()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save(MIXED, metadata={"format": "pt"})
    assert size == len(data) and digest == hash_file(str(tmp_path / "x.safetensors"), "xxh3_128")
    assert not (tmp_path / "x.safetensors.partial").exists()
    assert build_header(shard.tensors, {"format": "pt"}) == data[: len(build_header(shard.tensors, {"format": "pt"}))]


@pytest.mark.parametrize("direct_io", [True, False])
def test_writer_direct_and_page_cache_paths_write_safetensors_bytes(tmp_path, monkeypatch, direct_io):
    """Both write paths give safetensors.torch.save's bytes, with a small staging buffer so tensors
    straddle it and the tail needs padding and truncation under O_DIRECT."""
    from lemon_ext.checkpoint import direct_io as dio
    from lemon_ext.checkpoint.shards import Shard

    monkeypatch.setattr(dio, "STAGING_BYTES", 3 * dio.ALIGN)
    sd = {**MIXED, "odd": torch.arange(12345, dtype=torch.int16), "big": torch.randn(7001, dtype=torch.float64)}
    shard = Shard(0, "x.safetensors", file_order(_entries(sd)))
    w = ShardWriter(str(tmp_path), shard, direct_io=direct_io)
    for name, _, _ in shard.tensors:
        w.write(name, sd[name])
    went_direct = getattr(w._f, "direct", False)
    digest, size = w.close()
    assert went_direct == (direct_io and _takes_o_direct(tmp_path))
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save(sd, metadata={"format": "pt"}) and size == len(data) and len(data) % dio.ALIGN
    assert digest == _independent_digest("xxh3_128", data)


def _takes_o_direct(directory) -> bool:
    """Whether the filesystem of ``directory`` accepts an aligned O_DIRECT write (tmpfs does not)."""
    import mmap

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    path = os.path.join(directory, "probe.bin")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    try:
        os.write(fd, mmap.mmap(-1, 4096))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.remove(path)


def test_direct_file_falls_back_when_the_filesystem_refuses(tmp_path, monkeypatch):
    """A filesystem that takes O_DIRECT at open but refuses the first write (EINVAL): the file
    is finished through the page cache, same bytes."""
    from lemon_ext.checkpoint import direct_io as dio

    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(dio, "STAGING_BYTES", 2 * dio.ALIGN)
    import fcntl

    real_write, refused = os.write, []

    def refuse_direct(fd, buf):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(buf))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)

    monkeypatch.setattr(dio.os, "write", refuse_direct)
    payload = bytes(range(256)) * 50  # 12800 bytes: a full staging buffer, then a tail
    f = dio.DirectFile(str(tmp_path / "f.bin"))
    f.write(payload[:5000])
    f.write(payload[5000:])
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == payload
    assert refused and not f.direct


def _independent_digest(algorithm: str, data: bytes) -> str:
    """The digest computed straight from the libraries, not through lemon_ext.checkpoint.hashing."""
    import xxhash

    return {"sha256": hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}[algorithm]


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_writer_digest_is_the_files_digest(tmp_path, monkeypatch, algorithm):
    """close() returns the lowercase hex digest of the file's bytes, whether hashed inline (xxh3_128)
    or in the helper thread beside the write (sha256); hash_file agrees, reading in chunks."""
    from lemon_ext.checkpoint import hashing
    from lemon_ext.checkpoint.shards import Shard

    sd = {**MIXED, "big": torch.arange(3 << 20, dtype=torch.int32)}  # 12 MiB: several hash updates
    shard = Shard(0, "x.safetensors", file_order(_entries(sd)))
    w = ShardWriter(str(tmp_path), shard, hash_algorithm=algorithm)
    assert (w._hash_thread is not None) == (algorithm == "sha256")
    for name, _, _ in shard.tensors:
        w.write(name, sd[name])
    digest, size = w.close()
    data = (tmp_path / "x.safetensors").read_bytes()
    expected = _independent_digest(algorithm, data)
    assert digest == expected and size == len(data)
    assert len(digest) == {"sha256": 64, "xxh3_128": 32}[algorithm] and digest == digest.lower()
    path = str(tmp_path / "x.safetensors")
    assert hash_file(path, algorithm) == expected
    # Chunk boundaries do not change the digest (a 5 MiB chunk splits the 12 MiB tensor).
    monkeypatch.setattr(hashing, "CHUNK_BYTES", 5 << 20)
    assert hash_file(path, algorithm) == expected


def test_unknown_hash_algorithm_is_one_line(tmp_path):
    from lemon_ext.checkpoint.shards import Shard

    assert ALGORITHMS[0] == "xxh3_128" and set(ALGORITHMS) == {"xxh3_128", "sha256"}
    with pytest.raises(CheckpointError, match=r"hash algorithm 'md5': use one of xxh3_128, sha256$"):
        new_hasher("md5")
    with pytest.raises(CheckpointError, match="hash algorithm 'md5'"):
        ShardWriter(str(tmp_path), Shard(0, "x.safetensors", file_order(_entries(MIXED))), hash_algorithm="md5")
    assert not os.listdir(tmp_path)  # refused before a partial file exists


def test_writer_refuses_out_of_order_tensor(tmp_path):
    from lemon_ext.checkpoint.shards import Shard

    shard = Shard(0, "x.safetensors", file_order(_entries(MIXED)))
    w = ShardWriter(str(tmp_path), shard)
    with pytest.raises(CheckpointError, match="does not match the planned"):
        w.write("nope", torch.zeros(1))
    w.abort()
    assert not os.listdir(tmp_path)


def test_writer_enospc_is_one_line_and_removes_partial(tmp_path, monkeypatch):
    from lemon_ext.checkpoint import writer as writer_mod
    from lemon_ext.checkpoint.shards import Shard

    shard = Shard(0, "x.safetensors", file_order(_entries(MIXED)))
    w = ShardWriter(str(tmp_path), shard)

    def full(self, buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod.ShardWriter, "_emit", full)
    with pytest.raises(CheckpointError) as e:
        w.write(shard.tensors[0][0], MIXED[shard.tensors[0][0]])
    assert "no space left on device" in str(e.value) and "x.safetensors" in str(e.value)
    assert "\n" not in str(e.value)
    assert not os.listdir(tmp_path)


def test_read_header_and_tensors_match_safe_open(tmp_path):
    from safetensors import safe_open

    p = str(tmp_path / "m.safetensors")
    save_file(MIXED, p)
    _, entries = read_header(p)
    assert set(entries) == set(MIXED)
    fd = os.open(p, os.O_RDONLY)
    try:
        with safe_open(p, "pt") as f:
            for name in MIXED:
                t = read_tensor(fd, entries[name], p)
                assert t.dtype == MIXED[name].dtype and torch.equal(t, f.get_tensor(name))
    finally:
        os.close(fd)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:4], "truncated"),
    (lambda b: b[:-3], "truncated safetensors file: tensor"),
    (lambda b: b[:8] + b"x" + b[9:], "corrupt safetensors header"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "truncated or corrupt"),
])
def test_read_header_rejects_damaged_files(tmp_path, damage, match):
    p = tmp_path / "m.safetensors"
    p.write_bytes(damage(save({"w": torch.ones(4, 4)})))
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(str(p))
    assert str(p) in str(e.value)


def test_read_header_rejects_wrong_byte_count(tmp_path):
    raw = save({"w": torch.ones(4, 4)})
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    head["w"]["shape"] = [4, 5]
    body = json.dumps(head).encode()
    body += b" " * (-len(body) % 8)
    p = tmp_path / "m.safetensors"
    p.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    with pytest.raises(CheckpointError, match="tensor 'w' has 64 bytes but shape"):
        read_header(str(p))


def _write_dir(tmp_path, files: dict, index: dict | None = None, name="model.safetensors.index.json"):
    d = tmp_path / "src"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for fname, sd in files.items():
        if fname.endswith(".bin"):
            torch.save(sd, d / fname)
        else:
            save_file(sd, str(d / fname))
    if index is not None:
        (d / name).write_text(json.dumps(index))
    return str(d)


def test_source_single_sharded_and_bin_agree(tmp_path):
    a = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    b = {"z": torch.randn(2, 2).to(torch.bfloat16)}
    allt = {**a, **b}
    single = _write_dir(tmp_path / "1", {"model.safetensors": allt})
    sharded = _write_dir(tmp_path / "2", {"s1.safetensors": a, "s2.safetensors": b},
                         {"weight_map": {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"}})
    binary = _write_dir(tmp_path / "3", {"pytorch_model.bin": allt})
    sbin = _write_dir(tmp_path / "4", {"p1.bin": a, "p2.bin": b},
                      {"weight_map": {"x": "p1.bin", "y": "p1.bin", "z": "p2.bin"}}, "pytorch_model.bin.index.json")
    for path, fmt in [(single, "safetensors"), (sharded, "safetensors"), (binary, "bin"), (sbin, "bin")]:
        with SourceCheckpoint(path) as src:
            assert src.format == fmt
            assert src.shapes == {k: tuple(v.shape) for k, v in allt.items()}
            for k, v in allt.items():
                assert torch.equal(src.get(k), v) and src.dtypes[k] == v.dtype
            out = torch.empty(3, 4)
            assert torch.equal(src.get("x", out=out), a["x"])


@pytest.mark.parametrize("case,match", [
    ("missing_file", "index names missing file 's2.safetensors'"),
    ("missing_tensor", "tensor 'q' is listed in the index but not in the file"),
    ("unlisted_tensor", "tensor 'y' is in the file but not listed in the index"),
    ("no_weights", "no weights found"),
    ("no_config", "missing config.json"),
    ("bad_bin", "cannot load PyTorch weights"),
    ("pickle_bin", "cannot load PyTorch weights"),
])
def test_source_errors_name_the_file(tmp_path, case, match):
    a = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    if case == "missing_file":
        d = _write_dir(tmp_path, {"s1.safetensors": a}, {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}})
    elif case == "missing_tensor":
        d = _write_dir(tmp_path, {"s1.safetensors": a},
                       {"weight_map": {"x": "s1.safetensors", "y": "s1.safetensors", "q": "s1.safetensors"}})
    elif case == "unlisted_tensor":
        d = _write_dir(tmp_path, {"s1.safetensors": a}, {"weight_map": {"x": "s1.safetensors"}})
    elif case == "no_weights":
        d = _write_dir(tmp_path, {})
    elif case == "no_config":
        d = _write_dir(tmp_path, {"model.safetensors": a})
        os.remove(os.path.join(d, "config.json"))
    elif case == "bad_bin":
        d = _write_dir(tmp_path, {})
        with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
            f.write(b"PK\x03\x04 this is not a zip file")
    else:  # a pickle that would run code: weights_only=True refuses it
        import pickle

        d = _write_dir(tmp_path, {})

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
            pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match=match) as e:
        SourceCheckpoint(d)
    assert "\n" not in str(e.value) and isinstance(e.value, LemonError)


class _NotAStateDict(OrderedDict):
    """A class the weights-only unpickler does not allow (its module is not torch's)."""


class _CallsSystem:
    def __reduce__(self):  # pickled as a reference to os.system; never called by these tests
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case", ["os_system", "custom_class", "legacy_format"])
def test_unsafe_pickle_is_one_plain_line_naming_the_global(tmp_path, case):
    d = _write_dir(tmp_path, {})
    path = os.path.join(d, "pytorch_model.bin")
    if case == "custom_class":
        torch.save(_NotAStateDict(x=torch.zeros(2)), path)
        refused = f"{_NotAStateDict.__module__}.{_NotAStateDict.__qualname__}"
    else:  # zip format (memory-mapped path) and the legacy format (loaded whole)
        torch.save({"x": _CallsSystem()}, path, _use_new_zipfile_serialization=case == "os_system")
        refused = f"{os.system.__module__}.system"  # posix.system on Linux
    with pytest.raises(CheckpointError) as e:
        SourceCheckpoint(d)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused to unpickle global '{refused}' (weights_only=True loads tensors only;")
    assert msg.endswith(")") and "\n" not in msg and "\x1b" not in msg, msg


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size(1234) == 1234 and parse_size("1234") == 1234
    for bad in ("", "5XB", "-1GB", 0):
        with pytest.raises(CheckpointError):
            parse_size(bad)


def test_plan_shards_packing_names_and_index():
    f32 = torch.float32
    tensors = [(f"t{i}", f32, (10,)) for i in range(5)] + [("big", f32, (100,)), ("end", f32, (1,))]
    shards = plan_shards(tensors, 100)  # 40 bytes each: 2 per shard; big (400) alone
    assert [[n for n, _, _ in s.tensors] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"], ["end"]]
    assert [s.filename for s in shards][0] == "model-00001-of-00005.safetensors"
    idx = build_index(shards)
    assert idx["metadata"]["total_size"] == 5 * 40 + 400 + 4 and list(idx["weight_map"]) == sorted(idx["weight_map"])
    one = plan_shards(tensors, "5GB")
    assert len(one) == 1 and one[0].filename == "model.safetensors" and build_index(one) is None
    # Rank split: whole shards, every shard exactly once, independent of anything but the index.
    for world in (1, 2, 3):
        got = sorted(s.index for r in range(world) for s in shards_for_rank(shards, r, world))
        assert got == list(range(5))


def test_output_dir_refusals_and_commit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(CheckpointError, match="must not be the source"):
        OutputDir(str(src / "inner"), str(src)).check()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        OutputDir(str(dst), str(src)).check()
    out = OutputDir(str(dst), str(src), overwrite=True)
    out.prepare()
    assert os.path.basename(out.tmp).startswith(".") and os.path.isdir(out.tmp)
    (tmp_path / "dst" / "keep").read_text()  # the old DST is untouched until commit
    with open(out.path("model.safetensors"), "w") as f:
        f.write("new")
    out.commit()
    assert sorted(os.listdir(dst)) == ["model.safetensors"] and not os.path.exists(out.tmp)
    # A hidden directory of the same name that we did not make is refused, not deleted.
    foreign = OutputDir(str(tmp_path / "x"), str(src))
    os.makedirs(foreign.tmp)
    with pytest.raises(CheckpointError, match="not made by lemon-expand"):
        foreign.prepare()


def _resume_dir(tmp_path):
    """A prepared OutputDir (resume=True) holding one finished 10-byte shard, 'a.safetensors'."""
    src = tmp_path / "src"
    src.mkdir()
    out = OutputDir(str(tmp_path / "dst"), str(src), resume=True)
    out.prepare()
    with open(out.path("a.safetensors"), "wb") as f:
        f.write(b"0123456789")
    return out


def _write_record(out, record: dict) -> None:
    with open(os.path.join(out.progress, "a.safetensors.json"), "w") as f:
        json.dump(record, f)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_output_dir_resume_checks_digest(tmp_path, algorithm):
    out = _resume_dir(tmp_path)
    p = out.path("a.safetensors")
    digest = _independent_digest(algorithm, b"0123456789")
    out.record("a.safetensors", "fp", digest, 10, algorithm=algorithm)
    with open(os.path.join(out.progress, "a.safetensors.json")) as f:
        assert json.load(f) == {"fingerprint": "fp", "hash": {"algorithm": algorithm, "digest": digest}, "size": 10}
    assert out.resumable("a.safetensors", "fp", algorithm) == {"algorithm": algorithm, "digest": digest, "size": 10}
    assert out.resumable("a.safetensors", "other-plan", algorithm) is None
    # Resumed with the other algorithm: checked with the record's own, reported in the one asked for.
    other = "sha256" if algorithm == "xxh3_128" else "xxh3_128"
    assert out.resumable("a.safetensors", "fp", other)["digest"] == _independent_digest(other, b"0123456789")
    with open(p, "r+b") as f:
        f.write(b"X")
    assert out.resumable("a.safetensors", "fp", algorithm) is None
    assert out.resumable("a.safetensors", "fp", other) is None


def test_output_dir_resume_accepts_old_sha256_record(tmp_path):
    """A record written before the hash was a choice has no algorithm field, only "sha256"."""
    out = _resume_dir(tmp_path)
    sha = hashlib.sha256(b"0123456789").hexdigest()
    _write_record(out, {"fingerprint": "fp", "sha256": sha, "size": 10})
    assert out.resumable("a.safetensors", "fp", "sha256") == {"algorithm": "sha256", "digest": sha, "size": 10}
    xxh = _independent_digest("xxh3_128", b"0123456789")
    assert out.resumable("a.safetensors", "fp", "xxh3_128") == {"algorithm": "xxh3_128", "digest": xxh, "size": 10}
    with open(out.path("a.safetensors"), "r+b") as f:
        f.write(b"X")
    assert out.resumable("a.safetensors", "fp", "sha256") is None


@pytest.mark.parametrize("record", [
    {"hash": {"algorithm": "xxh3_128", "digest": "0" * 32}},  # wrong digest
    {"hash": {"algorithm": "sha256", "digest": hashlib.sha256(b"0123456789").hexdigest()[::-1]}},
    {"sha256": "0" * 64},  # an old record with a wrong digest
    {"hash": {"algorithm": "md5", "digest": "781e5e245d69b566979b86e28d23f2c7"}},  # unknown: rebuild
    {"hash": "garbage"},
    {},
], ids=["xxh3-wrong", "sha256-wrong", "old-wrong", "unknown-algorithm", "malformed", "no-digest"])
def test_output_dir_resume_rejects_bad_record(tmp_path, record):
    out = _resume_dir(tmp_path)
    _write_record(out, {"fingerprint": "fp", "size": 10, **record})
    assert out.resumable("a.safetensors", "fp", "xxh3_128") is None
    assert out.resumable("a.safetensors", "fp", "sha256") is None


class _Spec:
    """A stand-in for the engine's TensorSpec: target = source repeated along dim 0, + index."""

    def __init__(self, i, source, shape=(4, 3)):
        self.name, self.source, self.i = f"t{i}", source, i
        self.source_shape, self.target_shape = shape, (2 * shape[0],) + shape[1:]
        self.role, self.rule = "test", "repeat"

    def execute(self, src, *, seed, dtype=None, device=None, backend="auto"):
        base = torch.zeros(self.source_shape) if src is None else src
        out = torch.cat([base, base]) + self.i + seed
        return out.to(dtype or out.dtype)


def test_run_specs_order_reuse_and_bound():
    specs = [_Spec(i, f"s{i // 2}" if i % 5 else None) for i in range(12)]
    srcs = {f"s{j}": torch.full((4, 3), float(j)) for j in range(6)}
    fetched, got, live, peak = [], [], [0], [0]
    lock = threading.Lock()

    def fetch(name):
        fetched.append(name)
        return srcs[name].clone()

    orig = _Spec.execute

    def counting(self, *a, **k):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return orig(self, *a, **k)

    def sink(spec, t):
        got.append((spec.name, t.clone()))
        with lock:
            live[0] -= 1

    _Spec.execute = counting
    try:
        stats = pipeline.run_specs(specs, fetch, sink, device="cpu", seed=3, dtype={s.name: torch.float64 for s in specs})
    finally:
        _Spec.execute = orig
    assert [n for n, _ in got] == [s.name for s in specs]
    for s, (_, t) in zip(specs, got):
        assert t.dtype == torch.float64 and torch.equal(t, orig(s, srcs.get(s.source), seed=3).double())
    # consecutive specs reading the same source fetch it once
    assert len(fetched) == len({s.source for s in specs if s.source})
    assert peak[0] <= 2 and set(stats) == {"read", "compute", "sink", "wall"}


@pytest.mark.parametrize("where", ["fetch", "execute", "sink"])
def test_run_specs_propagates_errors(where):
    specs = [_Spec(i, f"s{i}") for i in range(6)]

    def fetch(name):
        if where == "fetch" and name == "s3":
            raise CheckpointError("bad fetch")
        return torch.ones(4, 3)

    def sink(spec, t):
        if where == "sink" and spec.name == "t2":
            raise CheckpointError("bad sink")

    if where == "execute":
        specs[4].source_shape = (9,)
        specs[4].execute = lambda *a, **k: (_ for _ in ()).throw(CheckpointError("bad execute"))
    with pytest.raises(CheckpointError, match=f"bad {where}"):
        pipeline.run_specs(specs, fetch, sink, device="cpu")
    assert not [t for t in threading.enumerate() if t.name.startswith("lemon-")]


def test_run_specs_refuses_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LemonError, match="CUDA is not available") as info:
        pipeline.run_specs([], lambda n: None, lambda s, t: None, device="cuda")
    assert not isinstance(info.value, CheckpointError)  # the execution layer's own error
    with pytest.raises(CheckpointError, match="CUDA is not available"):  # the checkpoint tool's
        resolve_device("cuda")


def test_big_bin_files_are_unmapped_after_each_read(tmp_path, monkeypatch):
    from lemon_ext.checkpoint import source as source_mod

    monkeypatch.setattr(source_mod, "_UNMAP_BYTES", 0)  # every file counts as big
    a = {"x": torch.randn(3, 4), "y": torch.randn(5)}
    d = _write_dir(tmp_path, {"pytorch_model.bin": a})
    with SourceCheckpoint(d) as src:
        for _ in range(2):
            for k, v in a.items():
                assert torch.equal(src.get(k), v)
                assert not src._bins  # the mapping was dropped: its pages leave RSS


def test_synthetic_checkpoint_is_the_same_in_every_process(tmp_path):
    """make_synthetic_llama (the benchmarks' source) depends on its seed only, not on str hashing."""
    import subprocess
    import sys

    script = ("import sys, hashlib, pathlib\n"
              "from lemon_ext.checkpoint.testing import make_synthetic_llama, synthetic_llama_config\n"
              "cfg = synthetic_llama_config(hidden=64, ffn=128, heads=4, kv_heads=2, layers=2, vocab=100)\n"
              "make_synthetic_llama(sys.argv[1], cfg, max_shard_size='1MB')\n"
              "h = hashlib.sha256()\n"
              "for f in sorted(pathlib.Path(sys.argv[1]).glob('*.safetensors')): h.update(f.read_bytes())\n"
              "print(h.hexdigest())\n")
    digests = []
    for k in (1, 2):
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"s{k}")], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PYTHONHASHSEED": str(k)})
        assert res.returncode == 0, res.stderr[-2000:]
        digests.append(res.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64
