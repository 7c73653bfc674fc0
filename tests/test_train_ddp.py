"""DDP through torchrun: 2 CPU processes on gloo match 1 process at the same global batch.

Run as a script by torchrun (the ``__main__`` block below is the worker); pytest runs the test.
The model is a plain module (no transformers import: each worker starts in ~2 s).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers_dist import torchrun_command, torchrun_env

# Each step: 2 processes x micro-batch 4 x 2 accumulation steps = 16 examples; 1 process runs
# micro-batch 8 x 2: data.py gives both the same 16 examples per step (the no_sync path is exercised).
STEPS, LR = 8, 3e-3


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> MLP -> vocab logits; forward(input_ids, labels) -> mean CE loss."""

    def __init__(self, vocab=32, width=24):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, labels):  # input_ids, labels: LongTensor[B, T]
        h = self.emb(input_ids)
        logits = self.head(h + self.mlp(self.ln(h)))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def make_data(n=80, seq=12):
    x = torch.randint(0, 32, (n, seq), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": r, "labels": (r * 7 + 1) % 32} for r in x]


def run(out_dir, batch_size):
    from lemon_ext.train import train

    torch.manual_seed(0)
    model = TinyLM()
    res = train(model, make_data(), make_data(24), out_dir=out_dir, batch_size=batch_size, grad_accum_steps=2,
                total_steps=STEPS, lr=LR, warmup_steps=2, eval_every=4, log_every=1, progress=False,
                save_every=4, seed=1)
    return model, res


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    model, ref = run(str(tmp_path / "one"), batch_size=8)
    cmd = torchrun_command(2, os.path.abspath(__file__), tmp_path / "two")
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    got = json.load(open(tmp_path / "two" / "result.json"))
    # Same examples per step; only the float summation order differs (two half-batch means
    # averaged by all-reduce vs one full mean): measured |diff| ~1e-7, asserted at 1e-5.
    assert [s for s, _ in got["losses"]] == [s for s, _ in ref.losses] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(got["losses"], ref.losses):
        assert a == pytest.approx(b, abs=1e-5)
    for (sa, a), (sb, b) in zip(got["evals"], ref.evals):
        assert sa == sb and a == pytest.approx(b, abs=1e-5)
    two = torch.load(tmp_path / "two" / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=False)
    assert two["world_size"] == 2
    for name, p in model.state_dict().items():
        torch.testing.assert_close(two["model"][name], p, atol=2e-5, rtol=0, msg=name)
    # both ranks wrote their RNG state (exact resume under DDP)
    assert sorted(f for f in os.listdir(tmp_path / "two" / "checkpoints" / f"step-{STEPS:08d}") if f.startswith("rng")) \
        == ["rng-rank0.pt", "rng-rank1.pt"]


if __name__ == "__main__":  # torchrun worker
    torch.set_num_threads(1)
    out = sys.argv[1]
    _, res = run(out, batch_size=4)
    if int(os.environ["RANK"]) == 0:
        json.dump({"losses": res.losses, "evals": res.evals}, open(os.path.join(out, "result.json"), "w"))
