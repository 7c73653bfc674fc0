"""The CUDA pipeline's orchestration (pinned pools, three streams, events, reader/writer threads)
run on CPU against a stand-in for its CUDA calls (``lemon_ext.execution.pipeline._CudaCalls``,
``tests/helpers_fake_cuda.py``): copies are deferred until their events are waited on and fresh
buffers are poisoned, so the bytes must equal ``expand_state_dict``'s. The eager stand-in runs
kernels on the host at launch; the lazy one (deferred kernels too) runs the same cases here and the
order-of-issue, pinned-bytes and hand-over tests in ``tests/test_pipeline_cuda_overlap.py``. Not
covered: real device memory, the caching allocator and races between truly concurrent engines:
those wait for a GPU (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch

from lemon_ext.checkpoint.testing import tiny_llama_config
from lemon_ext.engine import api as engine_api
from lemon_ext.engine import expand_state_dict
from lemon_ext.engine.api import expand_state_dict_pipelined
from lemon_ext.execution import pipeline

from helpers_fake_cuda import FakeCudaCalls

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)


def fake_cuda_run_specs(*, output_device="cpu", fetch_kind="plain", copy_out=None):
    """A stand-in for ``run_specs`` that takes ``pipeline._run_cuda`` with the compute "device" on
    CPU (the CUDA calls are the fake's). ``copy_out`` overrides the caller's; ``fetch_kind="out"``
    wraps the fetch in one accepting ``out=`` (as SourceCheckpoint.get does)."""

    def run(specs, fetch, sink, **kw):
        keep_copy = kw.get("copy_out", True) if copy_out is None else copy_out
        if fetch_kind == "out":
            def fetch(name, out=None, _get=fetch):  # noqa: E306
                t = _get(name)
                return t.clone() if out is None else out.copy_(t)
        return pipeline._run_cuda(list(specs), fetch, sink, torch.device("cpu"), seed=kw["seed"], dtype=kw["dtype"],
                                  backend=kw["backend"], prefetch=1, max_live_targets=2, copy_out=keep_copy,
                                  output_device=torch.device(output_device), source_dtypes=kw["source_dtypes"])

    return run


@pytest.fixture(scope="module")
def model_sd():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tied=False)).to(torch.bfloat16)
    return {k: v.detach() for k, v in model.state_dict().items()}, model.config.to_dict()


@pytest.mark.parametrize("lazy", [False, True], ids=["eager-kernels", "deferred-kernels"])
@pytest.mark.parametrize("copy_out,output_device,fetch_kind", [
    (True, "cpu", "plain"),    # expand_state_dict(..., device="cuda"): owned host tensors
    (True, "cpu", "out"),      # sources read straight into pinned buffers (fetch accepts out=)
    (False, "cpu", "out"),     # the checkpoint writer: views of reused pinned target buffers
    (False, "cuda", "plain"),  # results kept on the device
])
def test_cuda_pipeline_orchestration_gives_expand_state_dict_bytes(model_sd, monkeypatch, copy_out, output_device,
                                                                  fetch_kind, lazy):
    sd, cfg = model_sd
    fake = FakeCudaCalls(lazy=lazy)
    monkeypatch.setattr(pipeline, "_cuda_calls", fake)
    run = fake_cuda_run_specs(output_device=output_device, fetch_kind=fetch_kind, copy_out=copy_out)

    def run_specs_on_fake_cuda(specs, fetch, sink, **kw):
        # copy_out=False hands the sink views of reused buffers, valid only during the call
        keep = sink if copy_out or output_device != "cpu" else (lambda spec, t: sink(spec, t.clone()))
        return run(specs, fetch, keep, **kw)

    monkeypatch.setattr(engine_api, "run_specs", run_specs_on_fake_cuda)
    got, cfg_got = expand_state_dict_pipelined(sd, cfg, seed=3, device="cpu", **SIZES)
    ref, cfg_ref = expand_state_dict(sd, cfg, seed=3, **SIZES)
    assert list(got) == list(ref) and cfg_got == cfg_ref
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name
    assert fake.copies["d2h"] == (0 if output_device == "cuda" else len(ref))  # one copy back per target
    assert fake.copies["h2d"] > 0 and fake.pending() == 0
    assert fake.deferred_runs > 0  # copies did wait for their events
    assert fake.unpinned == len(fake.pinned_sizes)  # every page-locked buffer released at the end
    if lazy:
        assert fake.drives_by_issuer == 0  # the issuing thread never waited for the device


def test_checkpoint_through_cuda_orchestration_gives_cpu_bytes(monkeypatch, tmp_path):
    """expand_checkpoint's CUDA route: sources read straight into pinned buffers (SourceCheckpoint.get
    with out=), results handed to the shard writer as views of reused pinned buffers."""
    from lemon_ext.checkpoint import expand as expand_module
    from lemon_ext.checkpoint import expand_checkpoint
    from lemon_ext.checkpoint.testing import make_tiny_llama

    src = str(tmp_path / "src")
    make_tiny_llama(src, "sharded", tied=False, dtype=torch.bfloat16, seed=1)
    expand_checkpoint(src, str(tmp_path / "cpu"), seed=5, device="cpu", max_shard_size="200KB", progress=False, **SIZES)
    fake = FakeCudaCalls()
    monkeypatch.setattr(pipeline, "_cuda_calls", fake)
    monkeypatch.setattr(expand_module, "run_specs", fake_cuda_run_specs())  # its own copy_out=False
    expand_checkpoint(src, str(tmp_path / "fake"), seed=5, device="cpu", max_shard_size="200KB", progress=False, **SIZES)
    files = sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in (tmp_path / "fake").glob("*.safetensors"))
    for f in files:
        assert (tmp_path / "cpu" / f).read_bytes() == (tmp_path / "fake" / f).read_bytes(), f
    assert fake.copies["h2d"] > 0 and fake.copies["d2h"] > 0 and fake.pending() == 0 and fake.deferred_runs > 0


# ---- the same pipeline on a real GPU (benchmarks/gpu_check.sh runs these) ------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU stand-in above runs everywhere)")


@needs_gpu
@pytest.mark.parametrize("output_device", ["cpu", "cuda"])
def test_gpu_pipeline_equals_cpu_expand_state_dict(model_sd, output_device):
    sd, cfg = model_sd
    got, cfg_got = expand_state_dict_pipelined(sd, cfg, seed=3, device="cuda", output_device=output_device, **SIZES)
    ref, cfg_ref = expand_state_dict(sd, cfg, seed=3, **SIZES)
    assert list(got) == list(ref) and cfg_got == cfg_ref
    for name in ref:
        assert got[name].device.type == output_device and torch.equal(got[name].cpu(), ref[name]), name


@needs_gpu
def test_gpu_checkpoint_bytes_equal_cpu_run(tmp_path):
    from safetensors.torch import load_file

    from lemon_ext.checkpoint import expand_checkpoint
    from lemon_ext.checkpoint.testing import make_tiny_llama

    src = str(tmp_path / "src")
    make_tiny_llama(src, "sharded", tied=False, dtype=torch.bfloat16, seed=1)
    outs = {}
    for device in ("cpu", "cuda"):
        dst = str(tmp_path / f"out-{device}")
        expand_checkpoint(src, dst, seed=5, device=device, max_shard_size="200KB", progress=False, **SIZES)
        files = sorted(p.name for p in (tmp_path / f"out-{device}").glob("*.safetensors"))
        outs[device] = {f: (tmp_path / f"out-{device}" / f).read_bytes() for f in files}
        assert load_file(str(tmp_path / f"out-{device}" / files[0]))  # loads
    assert outs["cpu"] == outs["cuda"]


def test_pipeline_benchmark_runs_and_checks_its_sample(tmp_path):
    """benchmarks/bench_pipeline_gpu.py stays runnable where there is no GPU (--small --device cpu)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "row.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_pipeline_gpu.py"), "--small", "--device", "cpu",
                          "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["sample_mismatched"] == [] and len(row["sample_checked"]) == 3 and row["target_gb"] > row["source_gb"]
