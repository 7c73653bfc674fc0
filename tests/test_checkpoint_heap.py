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
before = faults()
for _ in range(6):  # target tensors of a shard: each freed once written, the next one allocated
    t = torch.empty(96 << 19, dtype=torch.bfloat16).fill_(1.0)
    del t
print(faults() - before)
"""


def _faults_of_six_tensors(mode: str) -> int:
    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_tensors_are_reused_not_refaulted():
    """Six 96 MB tensors one after the other: glibc's default maps each afresh (6 x 24576 page
    faults); with the heap kept, freed blocks serve the next tensors (a block freed just before a
    same-size aligned request may be passed over once, so at most 2 of the 6 fault)."""
    pages = (96 << 20) // 4096
    default = _faults_of_six_tensors("default")
    kept = _faults_of_six_tensors("keep")
    assert default > 5 * pages, f"glibc's default should fault every fresh 96 MB block ({default} faults)"
    assert kept < 2.5 * pages, f"with the heap kept, freed 96 MB blocks should be reused ({kept} faults)"
