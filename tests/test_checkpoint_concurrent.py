"""Two runs into one DST: one lock per output, held for the whole run, and a check of the files on
disk against the shard record before the final rename.

The race these guard against: a second run (a re-launched job, another terminal) deleted the first
one's ``.DST.lemon-partial`` while the first was still writing, and the first then renamed an
incomplete directory to DST and exited 0.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lemon_ext.checkpoint import expand_checkpoint, outdir
from lemon_ext.checkpoint.errors import CheckpointError
from lemon_ext.checkpoint.expand import dry_run
from lemon_ext.checkpoint.outdir import OutputDir
from lemon_ext.checkpoint.testing import make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
ARGS = ["--hidden-size", "64", "--intermediate-size", "128", "--num-attention-heads", "8",
        "--num-key-value-heads", "4", "--num-hidden-layers", "3", "--max-shard-size", "30KB", "--quiet"]
HELD = "another lemon-expand run holds this output"

# A lemon-expand run that stops after its first shard is on disk (before the second is started)
# and waits there until the file named by argv[2] appears.
_PAUSED_RUN = r"""
import os, sys, time
from lemon_ext.checkpoint import writer
paused, go = sys.argv[1], sys.argv[2]
real_close = writer.ShardWriter.close
closed = []
def close(self):
    out = real_close(self)
    closed.append(self.shard.filename)
    if len(closed) == 1:
        open(paused, "w").close()
        deadline = time.time() + 300
        while not os.path.exists(go):
            if time.time() > deadline:
                sys.exit("never released")
            time.sleep(0.05)
    return out
writer.ShardWriter.close = close
from lemon_ext.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LEMON_DEBUG"):
        env.pop(k, None)
    return env


def _read(path: str) -> dict:
    """Every file of an output directory, bytes; the report without its timings."""
    out = {}
    for f in sorted(os.listdir(path)):
        data = open(os.path.join(path, f), "rb").read()
        if f == "lemon_expansion.json":
            rep = json.loads(data)
            rep.pop("run")  # seconds and stage timings differ from run to run
            data = rep
        out[f] = data
    return out


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"the paused run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the paused run never reached its first shard")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("src") / "tiny")
    make_tiny_llama(p, "sharded", seed=3)
    return p


def test_two_runs_one_dst_exactly_one_succeeds(tiny, tmp_path):
    fresh, dst = str(tmp_path / "fresh"), str(tmp_path / "dst")
    expand_checkpoint(tiny, fresh, **SIZES, max_shard_size="30KB", progress=False)
    n_shards = len([f for f in os.listdir(fresh) if f.endswith(".safetensors")])
    assert n_shards > 2
    paused, go = str(tmp_path / "paused"), str(tmp_path / "go")
    first = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, paused, go, tiny, dst, *ARGS], env=_env(),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(paused, first)
        partial = os.path.join(str(tmp_path), ".dst.lemon-partial")
        before = {f: os.stat(os.path.join(partial, f)).st_ino for f in os.listdir(partial)}
        assert any(f.endswith(".safetensors") for f in before)

        # The second run, from another terminal: refused at once, one line, exit 2.
        second = subprocess.run([sys.executable, "-m", "lemon_ext.cli", tiny, dst, *ARGS], env=_env(), cwd=ROOT,
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lemon-expand: error:") and HELD in lines[0], lines
        # --resume and --overwrite take the lock too; a dry run does not need it.
        for kw in (dict(resume=True), dict(overwrite=True)):
            with pytest.raises(CheckpointError, match=HELD):
                expand_checkpoint(tiny, dst, **SIZES, max_shard_size="30KB", progress=False, **kw)
        text, errors = dry_run(tiny, dst, sizes=SIZES, options={}, max_shard_size="30KB")
        assert text and errors == []
        # The refused runs left the first run's directory alone (same files, same inodes).
        assert {f: os.stat(os.path.join(partial, f)).st_ino for f in os.listdir(partial)} == before
        assert not os.path.exists(dst)
    finally:
        open(go, "w").close()
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert _read(dst) == _read(fresh)  # complete, and byte for byte a single run's output
    assert sorted(os.listdir(tmp_path)) == ["dst", "fresh", "go", "paused"]  # no partial dir, no lock file


@pytest.mark.parametrize("damage", ["deleted", "truncated", "replaced"])
def test_files_checked_against_record_before_rename(tiny, tmp_path, monkeypatch, damage):
    """Whatever happened to the hidden directory while the run wrote it, DST appears only complete."""
    dst = str(tmp_path / "dst")
    real = OutputDir.remove_stray  # the last step before commit

    def remove_stray_then_damage(self, keep):
        real(self, keep)
        victim = self.path(sorted(k for k in keep if k and k.endswith(".safetensors"))[1])
        if damage == "deleted":
            os.remove(victim)
        elif damage == "truncated":
            with open(victim, "r+b") as f:
                f.truncate(100)
        else:  # what an unlocked second run did: delete the directory and prepare an empty one
            shutil.rmtree(self.tmp)
            os.makedirs(self.progress)
            open(os.path.join(self.tmp, outdir.MARKER), "w").close()

    monkeypatch.setattr(OutputDir, "remove_stray", remove_stray_then_damage)
    with pytest.raises(CheckpointError) as e:
        expand_checkpoint(tiny, dst, **SIZES, max_shard_size="30KB", progress=False)
    msg = str(e.value)
    assert "model-0000" in msg and "output not renamed" in msg and "\n" not in msg
    assert ("bytes on disk" in msg) == (damage == "truncated")
    assert not os.path.exists(dst)
    assert not os.path.exists(os.path.join(str(tmp_path), ".dst.lemon-lock"))  # released on failure too


def test_index_must_list_exactly_the_written_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    out = OutputDir(str(tmp_path / "dst"), str(src))
    out.prepare()
    for name in ("a.safetensors", "b.safetensors"):
        with open(out.path(name), "wb") as f:
            f.write(b"12345")
    with open(out.path("index.json"), "w") as f:
        json.dump({"weight_map": {"x": "a.safetensors", "y": "c.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="index and written shards disagree on 'b.safetensors'"):
        out.commit({"a.safetensors": 5, "b.safetensors": 5}, "index.json")
    assert not os.path.exists(out.dst)
    out.commit({"a.safetensors": 5}, None)
    assert os.path.isdir(out.dst)


def test_lock_refuses_second_holder_and_ignores_stale_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    dst = str(tmp_path / "dst")
    a, b = OutputDir(dst, str(src)), OutputDir(dst, str(src))
    a.lock()
    with pytest.raises(CheckpointError, match=f"{HELD} \\(lock {a.lockfile}\\); wait for it or choose another DST"):
        b.lock()
    a.unlock()
    assert not os.path.exists(a.lockfile)  # removed by the run that held it
    b.lock()
    b.unlock()

    # A run killed while holding the lock leaves the file; the kernel released the lock with it.
    r = subprocess.run([sys.executable, "-c", "import os, signal, sys\n"
                        "from lemon_ext.checkpoint.outdir import OutputDir\n"
                        "OutputDir(sys.argv[1], sys.argv[2]).lock()\n"
                        "os.kill(os.getpid(), signal.SIGKILL)\n", dst, str(src)],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9 and os.path.exists(a.lockfile), r.stderr
    a.lock()
    a.unlock()

    # Locked a file that the previous holder unlinked meanwhile (a newer run may hold the one now
    # at the path): lock() must notice and lock the file at the path instead.
    real_flock, calls = outdir.fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:
            os.remove(a.lockfile)
            open(a.lockfile, "w").close()
        return real_flock(fd, op)

    monkeypatch.setattr(outdir.fcntl, "flock", flock)
    a.lock()
    assert len(calls) == 2 and os.path.samestat(os.fstat(a._lock_fd), os.stat(a.lockfile))
    a.unlock()


def test_torchrun_refused_on_every_rank_without_waiting(tiny, tmp_path):
    """Rank 0 takes the lock; when it is held, every rank exits 2 (none waits at a barrier)."""
    dst = str(tmp_path / "dst")
    held = OutputDir(dst, tiny)
    held.lock()
    try:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "lemon_ext.cli", tiny, dst, *ARGS, "--device", "cpu"],
                           env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        held.unlock()
    assert r.returncode != 0 and HELD in r.stderr, r.stderr[-3000:]
    assert "rank 0 failed" in r.stderr  # rank 1 heard of it through the sync
    assert not os.path.exists(dst) and not os.path.exists(os.path.join(str(tmp_path), ".dst.lemon-partial"))
