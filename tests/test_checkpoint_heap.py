"""lemon-expand's heap setting (lemon_ext/checkpoint/heap.py): freed target tensors are reused
instead of faulting in fresh pages. Each probe runs in its own process (mallopt is process-wide)."""
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "keep":
    from lemon_ext.checkpoint.heap import keep_freed_pages
    assert keep_freed_pages(), "glibc refused the thresholds"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for size_mb in (96, 96, 64, 96):  # target tensors of a shard: freed once written, the next allocated
    before = faults()
    t = torch.empty(size_mb << 19, dtype=torch.bfloat16).fill_(1.0)
    last = faults() - before
    del t
print(last)
"""


def _faults_of_last_tensor(mode: str) -> int:
    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_tensors_are_reused_not_refaulted():
    pages = (96 << 20) // 4096  # 24576 pages of 4 KiB in a 96 MB tensor
    default = _faults_of_last_tensor("default")
    kept = _faults_of_last_tensor("keep")
    assert default > pages // 2, f"glibc's default should fault a fresh 96 MB block ({default} faults)"
    assert kept < pages // 20, f"with the heap kept the 96 MB block should be reused ({kept} faults)"
