"""The GPU pipeline's hot loop, checked on CPU against the lazy stand-in for its CUDA calls
(``tests/helpers_fake_cuda.py``: copies and kernels run only when some thread waits for them):

- overlap: the copy of tensor i+1 is queued before kernel i completes, and the issuing thread
  never waits for the device (a kernel may only run once the next copy has been queued; a stalled
  or self-waiting issuer fails the run; a negative control shows the check has teeth);
- pinned memory: exactly the planned page-locked bytes, sized by each tensor's dtype, page-rounded
  (not a power of two), and released at the end; host results are pageable copies;
- device results: made on the private compute stream, then ordered after their kernel on the
  caller's stream and marked in use there (``record_stream``) before the hand-over;
- stage timings (read, H2D, kernel, D2H, host copy, write) are reported;
- ``ops.expand`` reads nothing back from the device when the maps are host data (a source on the
  meta device, where any read raises).
"""
from __future__ import annotations

import math

import pytest
import torch

from lemon_ext import ops
from lemon_ext.errors import LemonError
from lemon_ext.checkpoint.testing import tiny_llama_config
from lemon_ext.engine import expand_state_dict, plan_expansion
from lemon_ext.execution import pipeline

from helpers_fake_cuda import PAGE, FakeCudaCalls

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)


@pytest.fixture(scope="module")
def model_sd():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tied=False)).to(torch.bfloat16)
    return {k: v.detach() for k, v in model.state_dict().items()}, model.config.to_dict()


def run_fake(sd, cfg, fake, monkeypatch, *, output_device="cpu", copy_out=True, dtype=None, sink=None):
    """``run_specs``' CUDA path on the stand-in (compute "device" = CPU); returns (outputs, stats, plan)."""
    monkeypatch.setattr(pipeline, "_cuda_calls", fake)
    plan = plan_expansion(cfg, seed=3, source_shapes={n: tuple(t.shape) for n, t in sd.items()}, **SIZES)
    out = {}

    def keep(spec, t):
        if sink is not None:
            sink(spec, t)
        out[spec.name] = t if copy_out or output_device != "cpu" else t.clone()

    dtypes = {s.name: dtype or sd[s.source].dtype for s in plan.specs}
    stats = pipeline._run_cuda(plan.specs, sd.__getitem__, keep, torch.device("cpu"), seed=3, dtype=dtypes,
                               backend="auto", prefetch=1, max_live_targets=2, copy_out=copy_out,
                               output_device=torch.device(output_device),
                               source_dtypes={n: t.dtype for n, t in sd.items()})
    return out, stats, plan


def check_bytes(sd, cfg, got, dtype=None):
    ref, _ = expand_state_dict(sd, cfg, seed=3, dtype=dtype, **SIZES)
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name


def test_next_copy_is_queued_before_the_kernel_completes(model_sd, monkeypatch):
    sd, cfg = model_sd
    n = len(plan_expansion(cfg, seed=3, source_shapes={k: tuple(v.shape) for k, v in sd.items()}, **SIZES).specs)
    fake = FakeCudaCalls(lazy=True, gate_kernels=n)
    got, stats, plan = run_fake(sd, cfg, fake, monkeypatch)
    assert all(s.source is not None for s in plan.specs) and fake.copies["h2d"] == n
    check_bytes(sd, cfg, got)
    log = fake.log
    for k in range(n - 1):
        assert log.index(("issue", "h2d", k + 1)) < log.index(("run", "kernel", k)), k
    assert fake.drives_by_issuer == 0  # the issuing thread never waited for the device


def test_the_order_check_catches_an_issuer_that_waits(model_sd, monkeypatch):
    """Negative control: an issuer that waits for each kernel (what a ``.item()`` or ``.cpu()``
    after the launch does) is caught."""
    sd, cfg = model_sd

    class SyncAfterLaunch(FakeCudaCalls):
        def launch(self, fn, shape, dtype):
            out = super().launch(fn, shape, dtype)
            self._current().synchronize()
            return out

    fake = SyncAfterLaunch(lazy=True, gate_kernels=10**6)
    with pytest.raises(AssertionError, match="issuing thread waited for kernel 0"):
        run_fake(sd, cfg, fake, monkeypatch)


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_pinned_bytes_are_sized_by_dtype_and_page_rounded(model_sd, monkeypatch, dtype):
    sd, cfg = model_sd
    fake = FakeCudaCalls(lazy=True)
    got, stats, plan = run_fake(sd, cfg, fake, monkeypatch, dtype=dtype)
    check_bytes(sd, cfg, got, dtype=dtype)
    out_size = (dtype or torch.bfloat16).itemsize
    max_src = max(math.prod(s.source_shape) for s in plan.specs) * 2  # bf16 sources
    max_tgt = max(math.prod(s.target_shape) for s in plan.specs) * out_size
    page = lambda b: -(-b // PAGE) * PAGE  # noqa: E731
    want = 2 * page(max_src) + 2 * page(max_tgt)  # (prefetch + 1) sources + max_live_targets targets
    assert sorted(fake.pinned_sizes) == sorted([page(max_src)] * 2 + [page(max_tgt)] * 2)
    assert stats["pinned_bytes"] == want == pipeline.pinned_plan(
        plan.specs, dtype={s.name: dtype or torch.bfloat16 for s in plan.specs},
        source_dtypes={k: v.dtype for k, v in sd.items()})["total"]
    before = 2 * max(math.prod(s.source_shape) for s in plan.specs) * 4 + 2 * max_tgt // out_size * 8  # fp32 / 8 B rule
    assert want < before
    assert fake.unpinned == len(fake.pinned_sizes)  # no page-locked buffer outlives the run


def test_pinned_buffer_is_registered_exactly_not_rounded_to_a_power_of_two(monkeypatch):
    """The real ``_CudaCalls.pinned``: page-aligned, page-rounded, registered with cudaHostRegister
    (the caching host allocator would round 2.1 GB up to 4.3 GB)."""
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size, flags))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    for nbytes in (1, PAGE - 1, PAGE + 1, 3 * 2**20 + 5, 2**22 + 1):
        t = pipeline._CudaCalls.pinned(nbytes)
        size = -(-nbytes // PAGE) * PAGE
        assert t.dtype == torch.uint8 and t.numel() == size and t.data_ptr() % PAGE == 0
        assert calls[-1] == ("register", t.data_ptr(), size, 1)  # cudaHostRegisterPortable
        pipeline._CudaCalls.unpin(t)
        assert calls[-1] == ("unregister", t.data_ptr())
    assert pipeline._CudaCalls.pinned(2**22 + 1).numel() < 2**23  # not the next power of two


def test_host_results_are_owned_pageable_copies(model_sd, monkeypatch):
    sd, cfg = model_sd
    fake = FakeCudaCalls(lazy=True)
    pinned: list[torch.Tensor] = []
    real = fake.pinned
    monkeypatch.setattr(fake, "pinned", lambda nbytes: pinned.append(real(nbytes)) or pinned[-1])
    got, stats, plan = run_fake(sd, cfg, fake, monkeypatch, copy_out=True)
    check_bytes(sd, cfg, got)
    assert len(pinned) == 4  # the two pools only: no page-locked tensor per result
    ptrs = {p.untyped_storage().data_ptr() for p in pinned}
    assert all(t.untyped_storage().data_ptr() not in ptrs for t in got.values())
    assert stats["host_copy"] > 0


def test_device_results_are_handed_over_on_the_callers_stream(model_sd, monkeypatch):
    sd, cfg = model_sd
    fake = FakeCudaCalls(lazy=True)
    seen = []

    def sink(spec, t):
        # at hand-over: in use on the consumer's stream, and that stream waits for the kernel
        assert (id(t), fake.consumer) in fake.kept, spec.name
        assert not t.reshape(-1).view(torch.uint8).eq(0xFF).all() or t.numel() == 0, "kernel had not run"
        seen.append(len(fake.consumer.ops))

    got, stats, plan = run_fake(sd, cfg, fake, monkeypatch, output_device="cuda", copy_out=False, sink=sink)
    check_bytes(sd, cfg, got)
    assert seen == list(range(1, len(plan.specs) + 1))  # one wait queued on the consumer per result
    assert {s.name for s in fake.launch_streams} == {"compute"}  # made on the private stream
    assert fake.copies["d2h"] == 0 and fake.pinned_sizes == [fake.pinned_sizes[0]] * 2  # source pool only


def test_stage_timings_are_reported(model_sd, monkeypatch):
    sd, cfg = model_sd
    got, stats, plan = run_fake(sd, cfg, FakeCudaCalls(lazy=True), monkeypatch)
    for key in ("read", "h2d", "compute", "d2h", "host_copy", "sink", "wall"):
        assert stats[key] >= 0, key
    assert stats["compute"] > 0 and stats["wall"] >= stats["compute"]


def test_constant_sources_go_through_the_pinned_pool(monkeypatch):
    """A spec without a source but with a fill (Post-LN identity norms) is built in a pinned
    buffer by the reader and copied up like any source (no pageable copy in the hot loop)."""
    from lemon_ext.engine.spec import TensorSpec

    spec = TensorSpec(name="norm.weight", source=None, source_shape=(1, 8), target_shape=(16,), role="norm",
                      rule="fill", row_map=torch.zeros(1, dtype=torch.int64), col_map=torch.arange(16) % 8,
                      view="vector", fill=1.0)
    fake = FakeCudaCalls(lazy=True)
    monkeypatch.setattr(pipeline, "_cuda_calls", fake)
    out = {}
    pipeline._run_cuda([spec], lambda name: pytest.fail("nothing to fetch"), lambda s, t: out.__setitem__(s.name, t),
                       torch.device("cpu"), seed=0, dtype={"norm.weight": torch.bfloat16}, backend="auto", prefetch=1,
                       max_live_targets=2, copy_out=True, output_device=torch.device("cpu"), source_dtypes={})
    assert fake.copies["h2d"] == 1
    assert torch.equal(out["norm.weight"], spec.execute(None, seed=0, dtype=torch.bfloat16))


# ---- ops.expand reads nothing back from the device ---------------------------------------------

@pytest.mark.parametrize("split", list(ops.SPLIT_MODES))
def test_expand_with_host_maps_never_reads_the_device(split):
    """On the meta device every read of a value raises (``.item()``, ``bool()``, ``.tolist()``,
    nonzero, ...), so this is the torch backend's per-call path (what a GPU runs without the
    compiled kernels) with no host sync; CUDA and Triton take the maps on the host too."""
    gen = torch.Generator().manual_seed(0)
    rm = torch.randint(0, 13, (40,), generator=gen)
    cm = torch.cat([torch.arange(11), torch.randint(0, 11, (26,), generator=gen)])
    rm[3], rm[4], cm[5], cm[6], cm[7] = ops.MEAN, ops.ZERO, ops.FREE, ops.MEAN, ops.ZERO
    src = torch.randn(13, 11, generator=gen)
    kw = dict(row_factor=torch.rand(40, generator=gen), col_factor=torch.rand(37, generator=gen), split=split,
              noise_std=0.1, seed=5, key=6, out_dtype=torch.bfloat16, backend="torch")
    out = ops.expand(src.to("meta"), rm, cm, **kw)
    assert out.device.type == "meta" and out.shape == (40, 37) and out.dtype == torch.bfloat16
    # and the host-map path gives the bytes of the device-map path
    from helpers_ops import assert_same_bits
    assert_same_bits(ops.expand(src, rm, cm, **kw), ops.expand(src, rm.clone(), cm.clone(), **kw), "host maps")


def test_maps_are_digested_once_per_map_pair():
    rm, cm = torch.arange(6) % 3, torch.arange(8) % 4
    a = ops.prepare_maps(rm, cm)
    assert ops.prepare_maps(rm, cm) is a  # cached
    assert ops.prepare_maps(rm.clone(), cm) is not a
    cm[0] = 1  # an in-place change is seen (version counter)
    b = ops.prepare_maps(rm, cm)
    assert b is not a and b.group_size[0] == 3
    with pytest.raises(LemonError, match="row_map"):
        ops.expand(torch.randn(2, 4), rm, cm)  # rows 0..2 against a 2-row source: checked on the host


def test_pinned_results_knob_keeps_the_earlier_design_for_measurement(model_sd, monkeypatch):
    """``_PINNED_RESULTS`` (benchmarks only): each host result is a fresh page-locked tensor, no
    target pool, same bytes; the default is the pool + pageable copies."""
    sd, cfg = model_sd
    fake = FakeCudaCalls(lazy=True)
    monkeypatch.setattr(pipeline, "_PINNED_RESULTS", True)
    got, stats, plan = run_fake(sd, cfg, fake, monkeypatch, copy_out=True)
    check_bytes(sd, cfg, got)
    assert fake.pinned_results == len(plan.specs) and len(fake.pinned_sizes) == 2 and stats["host_copy"] == 0


# ---- on a GPU (benchmarks/gpu_check.sh): the same properties with the real CUDA calls ------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU stand-ins above run everywhere)")


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("split", ["lemon", "projection"])
def test_gpu_expand_with_host_maps_never_syncs(backend, split):
    from helpers_ops import assert_same_bits, assert_within_ulp

    if ops.backends()[backend] is not None:
        pytest.skip(f"{backend}: {ops.backends()[backend]}")
    gen = torch.Generator().manual_seed(0)
    rm = torch.randint(0, 37, (75,), generator=gen)
    cm = torch.cat([torch.arange(29), torch.randint(0, 29, (32,), generator=gen)])
    rm[3], cm[5], cm[6] = ops.MEAN, ops.FREE, ops.MEAN
    src = (torch.randn(37, 29, generator=gen) * 3).to(torch.bfloat16)
    kw = dict(row_factor=torch.rand(75, generator=gen) + 0.5, col_factor=torch.rand(61, generator=gen) + 0.5,
              split=split, noise_std=0.02, seed=5, key=6)
    src_d = src.cuda()
    ops.expand(src_d, rm, cm, backend=backend, **kw)  # first call: compile / allocate outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device -> host read in the call raises
    try:
        got = ops.expand(src_d, rm, cm, backend=backend, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = ops.expand(src, rm, cm, backend="torch", **kw)
    (assert_within_ulp if backend == "triton" else assert_same_bits)(got.cpu(), want, f"{backend}/{split}")


@needs_gpu
def test_gpu_pipeline_device_results_survive_the_callers_stream(model_sd):
    """Results kept on the device are read on a side stream of the caller while the pipeline
    keeps allocating: bytes stay those of the CPU run."""
    from lemon_ext.engine.api import expand_state_dict_pipelined

    sd, cfg = model_sd
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got, _ = expand_state_dict_pipelined(sd, cfg, seed=3, device="cuda", output_device="cuda", **SIZES)
        sums = {n: t.float().sum() for n, t in got.items()}  # queued on the consumer stream
    ref, _ = expand_state_dict(sd, cfg, seed=3, **SIZES)
    side.synchronize()
    for name in ref:
        assert torch.equal(got[name].cpu(), ref[name]), name
        assert float(sums[name]) == float(ref[name].float().sum()), name


@needs_gpu
def test_gpu_pipeline_stats_and_pinned_bytes(model_sd):
    sd, cfg = model_sd
    plan = plan_expansion(cfg, seed=3, source_shapes={n: tuple(t.shape) for n, t in sd.items()}, **SIZES)
    out = {}
    stats = pipeline.run_specs(plan.specs, sd.__getitem__, lambda s, t: out.__setitem__(s.name, t), device="cuda",
                               seed=3, dtype={s.name: sd[s.source].dtype for s in plan.specs},
                               source_dtypes={n: t.dtype for n, t in sd.items()})
    check_bytes(sd, cfg, out)
    assert all(not t.is_pinned() for t in out.values())  # pageable results
    assert stats["pinned_bytes"] == pipeline.pinned_plan(plan.specs, dtype={s.name: torch.bfloat16 for s in plan.specs},
                                                         source_dtypes={n: t.dtype for n, t in sd.items()})["total"]
    assert stats["h2d"] > 0 and stats["compute"] > 0 and stats["d2h"] > 0


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["circular", "random", "sentinel"])
def test_gpu_raw_ops_take_host_maps_beside_a_gpu_source(backend, kind):
    from helpers_ops import assert_same_bits, assert_within_ulp, make_case, reference

    if ops.backends()[backend] is not None:
        pytest.skip(f"{backend}: {ops.backends()[backend]}")
    op = torch.ops.lemon_ext.expand if backend == "cuda" else torch.ops.lemon_ext.expand_triton
    for split in ops.SPLIT_MODES:
        args = make_case(kind, 37, 29, 75, 61, dtype=torch.bfloat16, split=split)
        # source and means on the GPU; maps, groups and factors stay on the host
        mixed = tuple(a.cuda() if k in (0, 7, 8) and isinstance(a, torch.Tensor) else a for k, a in enumerate(args))
        (assert_within_ulp if backend == "triton" else assert_same_bits)(op(*mixed).cpu(), reference(args),
                                                                         f"{backend}/{kind}/{split}")
