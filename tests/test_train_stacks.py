"""The schedule in the real training stacks: accelerate on 2 processes (torchrun, gloo) runs the
docs' recipe with the closed-form LR at every optimizer step; the HF Trainer follows it and
resumes exactly; accelerate's wrappers go through growth (expand_optimizer_state, carry_schedule)."""
import pathlib
import re
import subprocess

import pytest
import torch

from helpers_dist import torchrun_command, torchrun_env
from lemon_ext.schedule import lemon_lr_factor

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _docs_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"docs/training.md: {len(found)} python blocks contain {marker!r}"
    return found[0]


@pytest.mark.slow
def test_accelerate_recipe_on_two_processes(tmp_path):
    # The docs' block itself: it asserts the closed-form LR of each of its 30 optimizer steps
    # (warmup 5) with a prepared scheduler, which a plain LambdaLR fails on 2 processes (it
    # reached the peak at step 3 and ran steps 15-30 at LR 0).
    script = tmp_path / "accelerate_recipe.py"
    script.write_text(_docs_block("from accelerate import Accelerator"))
    # ACCELERATE_USE_CPU=1: what `accelerate launch --cpu` sets; without it accelerate treats
    # torchrun's CPU processes as independent single-process runs (the docs say so)
    proc = subprocess.run(torchrun_command(2, script), env=torchrun_env(ACCELERATE_USE_CPU="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es): LR 0.0e+00 -> 1.0e-03 -> " in proc.stdout


def tiny_gpt2(seed=0):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return transformers.GPT2LMHeadModel(cfg)


def lm_data(n=48, seq=16):
    x = torch.randint(0, 48, (n, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "labels": r} for r in x]


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def _trainer(out, total, callbacks=()):
    from transformers import Trainer, TrainingArguments

    from lemon_ext import lemon_schedule

    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = lemon_schedule(opt, warmup_steps=3, total_steps=total)
    args = TrainingArguments(output_dir=str(out), max_steps=total, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=3, data_seed=3)
    return Trainer(model=model, args=args, train_dataset=lm_data(), optimizers=(opt, sched), callbacks=list(callbacks))


def _log(trainer, key):
    return [(r["step"], r[key]) for r in trainer.state.log_history if key in r and "train_runtime" not in r]


def test_trainer_follows_closed_form_and_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    total = 10
    full = _trainer(tmp_path / "full", total)
    full.train()
    want = [2e-3 * lemon_lr_factor(s, warmup_steps=3, total_steps=total) for s in range(total)]
    assert [lr for _, lr in _log(full, "learning_rate")] == want

    first = _trainer(tmp_path / "cut", total, [_StopAt(4)])
    first.train()
    ckpt = tmp_path / "cut" / "checkpoint-4"
    assert ckpt.is_dir()
    second = _trainer(tmp_path / "cut", total)  # a new optimizer and schedule: restored from the checkpoint
    second.train(resume_from_checkpoint=str(ckpt))
    # the resumed Trainer's history starts with the checkpoint's (steps 1-4), then its own 5-10
    for key in ("learning_rate", "loss"):  # losses exact: data position and dropout RNG restored
        assert _log(first, key) == _log(full, key)[:4]
        assert _log(second, key) == _log(full, key)
        assert [s for s, _ in _log(second, key)] == list(range(1, total + 1))


def test_accelerate_wrappers_through_growth():
    # one process: AcceleratedOptimizer / AcceleratedScheduler are unwrapped by the growth calls
    import lemon_ext
    from lemon_ext import carry_schedule, expand_optimizer_state, lemon_schedule
    from lemon_ext.train import build_adamw

    torch.set_num_threads(1)
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_gpt2()
    opt = build_adamw(model, lr=1e-3)
    sched = lemon_schedule(opt, warmup_steps=2, total_steps=10)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    batch = lm_data(4)[:2]
    batch = {k: torch.stack([r[k] for r in batch]) for k in batch[0]}
    for _ in range(3):
        accelerator.backward(model(**batch).loss)
        opt.step(), sched.step(), opt.zero_grad()
    kw = dict(hidden_size=64, num_hidden_layers=3, seed=1)
    bare = accelerator.unwrap_model(model)
    big = lemon_ext.expand_model(bare, **kw)
    new_opt = expand_optimizer_state(opt, bare, big, **kw)
    new_sched = carry_schedule(sched, new_opt)
    assert isinstance(new_opt, torch.optim.AdamW) and new_opt.param_groups[0]["lr"] == 1e-3 * lemon_lr_factor(
        3, warmup_steps=2, total_steps=10)
    big, new_opt, new_sched = accelerator.prepare(big, new_opt, new_sched)
    accelerator.backward(big(**batch).loss)
    new_opt.step(), new_sched.step()
    assert new_opt.param_groups[0]["lr"] == 1e-3 * lemon_lr_factor(4, warmup_steps=2, total_steps=10)
