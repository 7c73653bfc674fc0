"""lemon_schedule's contract: its position is the optimizer's step count (extra .step() calls,
as accelerate's wrapper makes on N processes, change nothing); load_state_dict re-applies the
LR at once; pickling keeps counting; carry_schedule moves a running schedule to a new optimizer."""
import io

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from lemon_ext.errors import LemonError
from lemon_ext.schedule import carry_schedule, lemon_lr_factor, lemon_schedule

W, T, PEAK = 4, 20, 1e-3


def _want(s):
    return PEAK * lemon_lr_factor(s, warmup_steps=W, total_steps=T)


def _opt(groups=1, lr=PEAK):
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(groups)]
    return torch.optim.AdamW([{"params": [p], "lr": lr} for p in params])


def _step(opt):
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("calls_per_step", [1, 2, 8])
def test_lr_follows_optimizer_steps_whatever_the_calls(calls_per_step):
    opt = _opt()
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    seen = []
    for _ in range(T + 3):
        seen.append(opt.param_groups[0]["lr"])
        _step(opt)
        for _ in range(calls_per_step):  # accelerate's AcceleratedScheduler: num_processes calls
            sched.step()
    assert seen == [_want(s) for s in range(T + 3)]  # bitwise: the same expression
    assert sched.last_epoch == T + 3


def test_plain_lambdalr_would_run_n_times_faster():
    # the reference the contract is about: a plain LambdaLR stepped twice per optimizer step
    # reaches the peak at optimizer step W/2 (what 2 accelerate processes did)
    opt = _opt()
    plain = LambdaLR(opt, lambda s: lemon_lr_factor(s, warmup_steps=W, total_steps=T))
    for _ in range(W // 2):
        _step(opt)
        plain.step(), plain.step()
    assert opt.param_groups[0]["lr"] == PEAK


def test_missed_scheduler_call_catches_up():
    opt = _opt()
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    _step(opt), _step(opt), _step(opt)
    sched.step()
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == _want(3)


def test_load_state_dict_applies_the_lr_at_once():
    opt = _opt()
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    for _ in range(7):
        _step(opt), sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)  # plain data: loads with weights_only=True (HF Trainer does)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh_opt = _opt()
    fresh = lemon_schedule(fresh_opt, warmup_steps=W, total_steps=T)
    assert fresh_opt.param_groups[0]["lr"] == 0.0
    fresh.load_state_dict(state)
    assert fresh_opt.param_groups[0]["lr"] == _want(7)  # not 0.0 until the next step
    for s in range(7, 12):
        assert fresh_opt.param_groups[0]["lr"] == _want(s)
        _step(fresh_opt), fresh.step(), fresh.step()


def test_pickled_schedule_keeps_counting():
    opt = _opt()
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    _step(opt), sched.step()
    buf = io.BytesIO()
    torch.save(sched, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    _step(again.optimizer), again.step()
    assert again.last_epoch == 2 and again.optimizer.param_groups[0]["lr"] == _want(2)


def test_epoch_argument_is_refused():
    sched = lemon_schedule(_opt(), warmup_steps=W, total_steps=T)
    with pytest.raises(LemonError, match="epoch"):
        sched.step(3)


@pytest.mark.parametrize("lemon", [True, False])
def test_carry_schedule_continues_the_curve(lemon):
    opt = _opt(groups=2)
    opt.param_groups[1]["lr"] = 2 * PEAK  # per-group peaks survive the move
    if lemon:
        sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    else:  # any LambdaLR, e.g. transformers' schedules
        sched = LambdaLR(opt, lambda s: lemon_lr_factor(s, warmup_steps=W, total_steps=T))
    for _ in range(9):
        _step(opt), sched.step()
    new_opt = _opt(groups=2, lr=123.0)  # whatever lr it was built with
    new_opt.param_groups[0]["initial_lr"] = 7.0  # and a stale peak: both overwritten
    new = carry_schedule(sched, new_opt)
    for s in range(9, T + 2):
        assert new_opt.param_groups[0]["lr"] == pytest.approx(_want(s), rel=1e-15, abs=0)
        assert new_opt.param_groups[1]["lr"] == pytest.approx(2 * _want(s), rel=1e-15, abs=0)
        _step(new_opt), new.step()
    assert type(new) is type(sched)


def test_carry_schedule_errors_name_the_argument():
    opt = _opt()
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    with pytest.raises(LemonError, match="param groups"):
        carry_schedule(sched, _opt(groups=2))
    with pytest.raises(LemonError, match="^scheduler must be"):
        carry_schedule(torch.optim.lr_scheduler.StepLR(opt, 3), _opt())
    with pytest.raises(LemonError, match="^optimizer must be"):
        carry_schedule(sched, object())


def test_last_epoch_without_initial_lr_names_the_way_out():
    with pytest.raises(LemonError, match="carry_schedule"):
        lemon_schedule(_opt(), warmup_steps=W, total_steps=T, last_epoch=5)


def test_step_skipped_by_grad_scaler_does_not_advance():
    opt = _opt()
    sched = lemon_schedule(opt, warmup_steps=W, total_steps=T)
    scaler = torch.amp.GradScaler("cpu")
    p = opt.param_groups[0]["params"][0]
    for grad, advanced in ((1.0, 1), (float("inf"), 1), (1.0, 2)):
        scaler.scale((p * grad).sum()).backward()  # grad * scale: inf stays inf
        scaler.step(opt)  # inf gradients: the optimizer step is skipped
        scaler.update()
        opt.zero_grad()
        sched.step()
        assert sched.last_epoch == advanced and opt.param_groups[0]["lr"] == _want(advanced)
