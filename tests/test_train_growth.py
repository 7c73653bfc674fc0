"""Growth mid-run: expand_optimizer_state + carry_schedule keep the running LEMON schedule's LR
curve (closed form at every optimizer step across the growth: no zero step, no jump to the peak,
no frozen LR); expand_optimizer_state refuses arguments that do not match the grown model."""
import pytest
import torch

import lemon_ext
from lemon_ext import carry_schedule, expand_optimizer_state, lemon_schedule
from lemon_ext.errors import LemonError
from lemon_ext.schedule import lemon_lr_factor
from lemon_ext.train import build_adamw

transformers = pytest.importorskip("transformers")

W, T, PEAK, GROW_AT = 3, 12, 2e-3, 5
KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, seed=11)


def tiny_gpt2():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=8, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _batch(i):
    x = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(i))
    return {"input_ids": x, "labels": x}


def _step(model, opt, sched, i, lrs):
    model(**_batch(i)).loss.backward()
    lrs.append(opt.param_groups[0]["lr"])
    opt.step(), sched.step(), opt.zero_grad()


def _source_after(steps):
    model = tiny_gpt2()
    opt = build_adamw(model, lr=PEAK)
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    lrs = []
    for i in range(steps):
        _step(model, opt, sched, i, lrs)
    return model, opt, sched, lrs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_carry_schedule_keeps_the_curve_across_growth():
    small, opt, sched, lrs = _source_after(GROW_AT)
    big = lemon_ext.expand_model(small, **KW)
    opt = expand_optimizer_state(opt, small, big, **KW)
    sched = carry_schedule(sched, opt)
    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    for i in range(GROW_AT, T + 2):
        _step(big, opt, sched, i, lrs)
    want = [PEAK * lemon_lr_factor(s, warmup_steps=W, total_steps=T) for s in range(T + 2)]
    assert lrs == want  # every group, every step: the same float expression
    assert all(g["lr"] == PEAK * lemon_lr_factor(T + 2, warmup_steps=W, total_steps=T) for g in opt.param_groups)
    assert lrs[GROW_AT] > 0 and lrs[GROW_AT] < PEAK  # first grown step: mid-decay, neither 0 nor the peak
    moved = [n for n, p in big.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)  # the new optimizer really trains every grown weight


def test_fresh_schedule_on_grown_optimizer_starts_from_the_current_lr():
    # the docs' old recipe (warmup_steps=0 over the remaining steps) jumped back to the original
    # peak: initial_lr was copied into the new groups; now the current LR is the new start
    small, opt, sched, lrs = _source_after(GROW_AT)
    current = opt.param_groups[0]["lr"]
    big = lemon_ext.expand_model(small, **KW)
    new_opt = expand_optimizer_state(opt, small, big, **KW)
    assert all("initial_lr" not in g for g in new_opt.param_groups)
    lemon_schedule(new_opt, warmup_steps=0, total_steps=T - GROW_AT)
    assert new_opt.param_groups[0]["lr"] == current < PEAK


@pytest.fixture(scope="module")
def grown_pair():
    small, opt, _, _ = _source_after(2)
    return small, opt, lemon_ext.expand_model(small, **KW)


@pytest.mark.parametrize("field, value", [("hidden_size", 96), ("num_hidden_layers", 4), ("intermediate_size", 192)])
def test_size_mismatch_names_the_field(grown_pair, field, value):
    small, opt, big = grown_pair
    with pytest.raises(LemonError, match=rf"^{field}: the expansion arguments give {value}, model_t has") as info:
        expand_optimizer_state(opt, small, big, **{**KW, field: value})
    assert "\n" not in str(info.value)


def test_other_seed_is_refused(grown_pair):
    small, opt, big = grown_pair
    with pytest.raises(LemonError, match=r"^seed: model_t's .* is not the expansion of model_s's") as info:
        expand_optimizer_state(opt, small, big, **{**KW, "seed": KW["seed"] + 1})
    assert "\n" not in str(info.value)


def test_trained_target_is_refused(grown_pair):
    small, opt, big = grown_pair
    trained = lemon_ext.expand_model(small, **KW)
    with torch.no_grad():
        trained.transformer.h[0].mlp.c_fc.weight.mul_(1.01)
    with pytest.raises(LemonError, match="before training model_t"):
        expand_optimizer_state(opt, small, trained, **KW)


def test_same_arguments_pass_and_compiled_models_are_unwrapped(grown_pair):
    small, opt, big = grown_pair
    new = expand_optimizer_state(opt, torch.compile(small), torch.compile(big), **KW)
    assert len(new.state) == len(list(big.parameters()))
