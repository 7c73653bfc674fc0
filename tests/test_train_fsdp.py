"""FSDP2 (``fully_shard``) on CPU/gloo: 2 torchrun processes give DDP's losses with accumulation 2,
resume exactly through the checkpoint's FSDP branch, and export a gathered Hugging Face directory;
in one process ``parallel="fsdp"`` really shards (over a private 1-process group).

Run as a script by torchrun (the ``__main__`` block is the worker: it runs every mode, so the
transformers import is paid once per process); pytest runs the tests.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers_dist import torchrun_command, torchrun_env

transformers = pytest.importorskip("transformers")

STEPS = 6
BASE = dict(batch_size=2, grad_accum_steps=2, total_steps=STEPS, lr=3e-3, warmup_steps=2, max_grad_norm=0.5,
            eval_every=3, log_every=1, progress=False, seed=4, tensorboard=False)


def tiny_gpt2(seed=0):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def lm_data(n=40, seq=12, seed=1):
    x = torch.randint(0, 40, (n, seq), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in x]


def worker(out):
    import torch.distributed as dist

    from lemon_ext.train import train

    # One group for the four runs: train() joins a group it finds and leaves it up (re-creating
    # the default group repeatedly in one torchrun worker reuses store keys and can hang).
    dist.init_process_group("gloo")
    data, held = lm_data(), lm_data(8, seed=2)
    runs = {}
    runs["ddp"] = train(tiny_gpt2(), data, held, out_dir=f"{out}/ddp", parallel="ddp", **BASE)
    runs["fsdp"] = train(tiny_gpt2(), data, held, out_dir=f"{out}/fsdp", parallel="fsdp",
                         export_dir=f"{out}/export", **BASE)
    runs["first"] = train(tiny_gpt2(), data, held, out_dir=f"{out}/resumed", parallel="fsdp", stop_after=3, **BASE)
    # another init: every weight, moment and RNG stream must come from the FSDP checkpoint
    runs["second"] = train(tiny_gpt2(seed=9), data, held, out_dir=f"{out}/resumed", parallel="fsdp", **BASE)
    if int(os.environ["RANK"]) == 0:
        json.dump({k: {"losses": r.losses, "evals": r.evals} for k, r in runs.items()}, open(f"{out}/result.json", "w"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_two_processes_match_ddp_resume_and_export(tmp_path):
    cmd = torchrun_command(2, os.path.abspath(__file__), tmp_path)
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.load(open(tmp_path / "result.json"))
    ddp, fsdp = got["ddp"], got["fsdp"]
    assert [s for s, _ in fsdp["losses"]] == list(range(1, STEPS + 1))
    # the same examples, dropout masks and reductions: equal to DDP's up to float summation order
    for (_, a), (_, b) in zip(fsdp["losses"], ddp["losses"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert [s for s, _ in fsdp["evals"]] == [s for s, _ in ddp["evals"]] == [3, 6]
    for (_, a), (_, b) in zip(fsdp["evals"], ddp["evals"]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    # resume through the FSDP checkpoint: bit-identical to the uninterrupted FSDP run
    assert got["first"]["losses"] + got["second"]["losses"] == fsdp["losses"]
    assert got["first"]["evals"] + got["second"]["evals"] == fsdp["evals"]

    # the export is the gathered model: loads with from_pretrained, equals the final checkpoint
    # (full tensors gathered the same way) and DDP's weights up to float order
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    ckpt = torch.load(tmp_path / "fsdp" / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=False)
    ddp_ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=False)
    sd = exported.state_dict()
    assert set(sd) == set(ckpt["model"])
    for name, t in sd.items():
        assert torch.equal(t, ckpt["model"][name]), name
        torch.testing.assert_close(t, ddp_ckpt["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()  # still tied


def test_fsdp_in_one_process_shards_and_matches_unsharded():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from lemon_ext.train import train

    torch.set_num_threads(1)
    data, held = lm_data(24), lm_data(4, seed=2)
    kw = dict(BASE, total_steps=3, eval_every=0)
    plain = train(tiny_gpt2(), data, held, parallel="none", **kw)
    model = tiny_gpt2()
    sharded = train(model, data, held, parallel="fsdp", **kw)
    assert isinstance(model.transformer.h[0].attn.c_attn.weight, DTensor)  # really sharded, not silently plain
    assert not dist.is_initialized()  # its private group is gone
    for (_, a), (_, b) in zip(sharded.losses, plain.losses):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    assert sharded.evals[-1][1] == pytest.approx(plain.evals[-1][1], rel=1e-6)


if __name__ == "__main__":  # torchrun worker
    torch.set_num_threads(1)
    worker(sys.argv[1])
