"""The op API: backends(), backend selection and errors, opcheck, torch.compile, import without _C."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lemon_ext import ops
from lemon_ext.errors import LemonError

from helpers_ops import assert_same_bits, make_case, skip_reason

needs_cpu_kernel = pytest.mark.skipif(skip_reason("cpu") is not None, reason=f"cpu: {skip_reason('cpu')}")


def test_backends_report_every_backend_with_a_reason():
    status = ops.backends()
    assert set(status) == {"torch", "cpu", "cuda", "triton"}
    assert status["torch"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name
    if not torch.cuda.is_available():
        assert status["cuda"] is not None


def test_missing_backend_raises_with_how_to_build():
    missing = [name for name, reason in ops.backends().items() if reason is not None]
    if not missing:
        pytest.skip("every backend is present on this machine")
    src = torch.randn(4, 4)
    with pytest.raises(LemonError, match="not available"):
        ops.expand(src, torch.arange(4), torch.arange(4), backend=missing[0])
    with pytest.raises(LemonError, match="unknown backend"):
        ops.expand(src, torch.arange(4), torch.arange(4), backend="fortran")


@needs_cpu_kernel
def test_auto_picks_the_cpp_kernel_on_cpu_and_reference_for_float64(monkeypatch):
    calls = []
    real = ops.reference.expand_reference
    monkeypatch.setattr(ops.reference, "expand_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = torch.randn(6, 5)
    ops.expand(src, torch.arange(6), torch.arange(10) % 5, split="lemon")
    assert calls == []
    ops.expand(src.double(), torch.arange(6), torch.arange(10) % 5, split="lemon")
    assert calls == [1]
    with pytest.raises(LemonError, match="float64"):
        ops.expand(src.double(), torch.arange(6), torch.arange(5), backend="cpu")


def test_bad_maps_raise_lemon_error():
    src = torch.randn(4, 4)
    with pytest.raises(LemonError, match="row_map"):
        ops.expand(src, torch.tensor([0, 4]), torch.arange(4))
    with pytest.raises(LemonError, match="col_map"):
        ops.expand(src, torch.arange(4), torch.tensor([-4, 0]))
    with pytest.raises(LemonError, match="at most 32"):
        ops.expand(src, torch.arange(4), torch.zeros(33, dtype=torch.int64))


@needs_cpu_kernel
def test_raw_op_checks_name_the_argument():
    args = list(make_case("random", 4, 4, 6, 6))
    args[1] = torch.tensor([0, 1, 9, 0, 0, 0])
    with pytest.raises(RuntimeError, match=r"row_map\[2\] = 9"):
        torch.ops.lemon_ext.expand(*args)
    args = list(make_case("random", 4, 4, 6, 6))
    args[4] = torch.ones(5)
    with pytest.raises(RuntimeError, match="col_factor must have 6 elements"):
        torch.ops.lemon_ext.expand(*args)


@pytest.mark.skipif(skip_reason("cuda") is not None, reason=f"cuda: {skip_reason('cuda')}")
@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("maps_on", ["cuda", "cpu"])  # device maps: one sync; host maps: checked on the host
def test_raw_cuda_op_refuses_out_of_range_maps(axis, maps_on):
    # the raw op, not the front door: a bad index must be an error, never a read outside the source
    args = list(make_case("random", 4, 4, 6, 6, device="cuda"))
    for k in (1, 2, 5, 6):  # row_map, col_map, group_size, group_pos
        args[k] = args[k].to(maps_on)
    args[1 if axis == "row" else 2] = torch.tensor([0, 1, 9, 0, 0, 0], device=maps_on)
    with pytest.raises(RuntimeError, match=f"{axis}_map entries must be source"):
        torch.ops.lemon_ext.expand(*args)


@needs_cpu_kernel
def test_opcheck():
    for split in ("none", "lemon", "projection"):
        args = make_case("sentinel", 9, 7, 13, 17, dtype=torch.bfloat16, split=split)
        torch.library.opcheck(torch.ops.lemon_ext.expand.default, args)


def test_fake_kernel_gives_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = make_case("random", 9, 7, 13, 17, dtype=torch.float16, out_dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.lemon_ext.expand(*fake)
    assert out.shape == (13, 17) and out.dtype == torch.bfloat16


@needs_cpu_kernel
def test_torch_compile_fullgraph():
    args = make_case("sentinel", 9, 7, 13, 17, dtype=torch.bfloat16, split="lemon")

    def f(source, *rest):
        return torch.ops.lemon_ext.expand(source * 1, *rest) * 1  # the op inside a traced graph

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_same_bits(compiled(*args), f(*args), "compiled")


def test_imports_without_c_extension_and_without_touching_cuda():
    # A checkout without a build must import, run the reference, and say how to build (never
    # fail on import); importing must not initialise CUDA.
    code = textwrap.dedent("""
        import sys
        sys.modules["lemon_ext._C"] = None  # make `from .. import _C` fail like an unbuilt tree
        import torch
        from lemon_ext import ops
        from lemon_ext.errors import LemonError
        assert not torch.cuda.is_initialized()
        reason = ops.backends()["cpu"]
        assert reason and "not built" in reason and "--no-build-isolation" in reason, reason
        out = ops.expand(torch.randn(3, 3), torch.arange(3), torch.arange(6) % 3, split="lemon")
        assert out.shape == (3, 6)
        try:
            ops.expand(torch.randn(3, 3), torch.arange(3), torch.arange(3), backend="cpu")
        except LemonError as e:
            assert "pip install --no-build-isolation -e ." in str(e), e
        else:
            raise AssertionError("backend='cpu' without _C did not raise")
        print("ok")
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
