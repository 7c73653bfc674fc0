"""lemon_ext.train: exact resume, decay groups, task types, metrics, argument errors (CPU)."""
import json

import pytest
import torch
from torch import nn

from lemon_ext.errors import LemonError
from lemon_ext.train import TrainConfig, build_adamw, decay_groups, latest_checkpoint, train

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # 2 shared cores: two OpenMP threads contending with another process made a 32-wide GPT-2
    # step 25x slower (1.0 s vs 0.04 s measured); one thread keeps the CI time predictable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_gpt2(seed=0, dropout=0.1):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def lm_data(n=72, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 48, (n, seq), generator=g)
    return [{"input_ids": r, "labels": r} for r in x]


BASE = dict(batch_size=4, grad_accum_steps=2, total_steps=14, lr=3e-3, warmup_steps=3, max_grad_norm=0.5,
            eval_every=4, log_every=3, progress=False, seed=5)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    # 72 examples / global batch 8 = 9 steps per epoch: the 14-step run crosses an epoch, the
    # interruption at step 6 is mid-epoch, and dropout is on, so data position and RNG both matter.
    data, held = lm_data(), lm_data(16, seed=2)
    full = tiny_gpt2()
    ref = train(full, data, held, out_dir=str(tmp_path / "a"), **BASE)
    assert [s for s, _ in ref.losses] == list(range(1, 15))

    first = train(tiny_gpt2(), data, held, out_dir=str(tmp_path / "b"), stop_after=6, **BASE)
    assert first.step == 6 and latest_checkpoint(str(tmp_path / "b")).endswith("step-00000006")
    # a different init: everything must come from the checkpoint
    resumed_model = tiny_gpt2(seed=123)
    second = train(resumed_model, data, held, out_dir=str(tmp_path / "b"), **BASE)
    assert second.step == 14
    assert first.losses + second.losses == ref.losses  # bit-exact, not approx
    assert [e for e in first.evals + second.evals] == ref.evals
    for (name, a), b in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name

    # metrics.jsonl reads as one run: one line per logged step, no duplicates after the resume
    lines = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    train_steps = [r["step"] for r in lines if "loss" in r]
    assert train_steps == [3, 6, 9, 12, 14]
    assert [r["step"] for r in lines if "eval_loss" in r] == [4, 8, 12, 14]


def test_training_lowers_loss_and_saves_final_checkpoint(tmp_path):
    # a learnable signal: each sequence repeats one token
    data = [{"input_ids": torch.full((16,), i % 48), "labels": torch.full((16,), i % 48)} for i in range(64)]
    res = train(tiny_gpt2(dropout=0.0), data, data[:16], out_dir=str(tmp_path), batch_size=8, total_steps=20,
                lr=1e-2, warmup_steps=2, eval_at_start=True, progress=False)
    assert res.evals[0][0] == 0 and res.evals[-1][0] == 20
    assert res.evals[-1][1] < 0.75 * res.evals[0][1]
    assert res.checkpoint.endswith("step-00000020")
    again = train(tiny_gpt2(dropout=0.0), data, out_dir=str(tmp_path), batch_size=8, total_steps=20, progress=False)
    assert again.step == 20 and again.losses == []  # already done: resumes at the end, trains nothing


def test_masked_lm_and_classification_models():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=16, num_labels=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (32, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]  # predict every 4th token from its masked position
    masked = ids.clone()
    masked[:, ::4] = 4
    mlm = [{"input_ids": a, "labels": b} for a, b in zip(masked, labels)]
    res = train(transformers.BertForMaskedLM(bert), mlm, mlm[:8], batch_size=8, total_steps=12, lr=3e-3,
                progress=False, eval_at_start=True)
    assert len(res.losses) == 12 and res.evals[-1][1] < res.evals[0][1] - 0.1

    cls = [{"input_ids": a, "labels": torch.tensor(int(a[0]) % 3)} for a in ids]
    res = train(transformers.BertForSequenceClassification(bert), cls, batch_size=8, total_steps=3, lr=1e-3,
                progress=False)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in res.losses)


class LossModule(nn.Module):
    """Any module returning its loss: (x, y) tuples in, scalar out."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)


def test_plain_module_returning_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = list(zip(x, x.sum(-1)))
    model = LossModule()
    res = train(model, data, data, batch_size=16, total_steps=60, lr=1e-2, weight_decay=0.0, progress=False,
                eval_at_start=True)
    assert res.evals[-1][1] < 0.2 * res.evals[0][1]


def test_decay_groups_exclude_norms_biases_embeddings():
    model = tiny_gpt2()
    decay, no_decay = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in kept and "transformer.wpe.weight" in kept  # (tied lm_head too)
    assert "transformer.h.0.ln_1.weight" in kept and "transformer.h.0.attn.c_attn.bias" in kept
    assert decayed == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    n_params = len(list(model.parameters()))  # tied head counted once
    assert len(decayed) + len(kept) == n_params
    assert isinstance(build_adamw(model, lr=1e-3), torch.optim.AdamW)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("total_steps", -1), ("lr", 0.0),
                                          ("precision", "fp8"), ("parallel", "tp"), ("grad_accum_steps", 1.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(LemonError, match=field):
        train(LossModule(), [(torch.zeros(4), torch.tensor(0.0))] * 8, **{field: value})


def test_unknown_option_and_too_small_dataset():
    with pytest.raises(LemonError, match="learning_rate"):
        TrainConfig().replace(learning_rate=1.0)
    with pytest.raises(LemonError, match="fewer than one global batch"):
        train(LossModule(), [(torch.zeros(4), torch.tensor(0.0))] * 3, batch_size=4, progress=False)
