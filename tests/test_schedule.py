"""lemon_schedule / lemon_total_steps: closed form, state_dict round trip, argument errors."""
import math

import pytest
import torch

from lemon_ext.errors import LemonError
from lemon_ext.schedule import lemon_lr_factor, lemon_schedule, lemon_total_steps


def _opt(lr=1e-3, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.AdamW([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)])


def _closed_form(s, w, t, m, decay):
    if s < w:
        return s / w
    if s >= t:
        return m
    p = (s - w) / (t - w)
    shape = 0.5 * (1 + math.cos(math.pi * p)) if decay == "cosine" else 1 - p
    return m + (1 - m) * shape


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_values_match_closed_form(decay, min_lr_ratio):
    w, t, peak = 10, 100, 3e-4
    opt = _opt(peak, groups=2)
    sched = lemon_schedule(opt, warmup_steps=w, total_steps=t, min_lr_ratio=min_lr_ratio, decay=decay)
    seen = {}
    for s in range(130):
        seen[s] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    # hand-picked points: start, mid-warmup, peak, mid-decay, end, after the end
    checks = {0: 0.0, 5: 0.5, 10: 1.0, 55: None, 100: min_lr_ratio, 129: min_lr_ratio}
    for s, want in checks.items():
        f = _closed_form(s, w, t, min_lr_ratio, decay) if want is None else want
        assert seen[s][0] == pytest.approx(peak * f, rel=1e-12, abs=1e-18)
        assert seen[s][1] == pytest.approx(2 * peak * f, rel=1e-12, abs=1e-18)  # per-group peak
    mid = 0.5 * (1 + min_lr_ratio)  # half-way through the decay both shapes sit at the midpoint
    assert seen[55][0] == pytest.approx(peak * mid, rel=1e-12)
    for s in range(130):
        assert seen[s][0] == pytest.approx(peak * _closed_form(s, w, t, min_lr_ratio, decay), rel=1e-12, abs=1e-18)


def test_equals_transformers_cosine_schedule():
    transformers = pytest.importorskip("transformers")
    a, b = _opt(1.0), _opt(1.0)
    ours = lemon_schedule(a, warmup_steps=7, total_steps=50)
    theirs = transformers.get_cosine_schedule_with_warmup(b, num_warmup_steps=7, num_training_steps=50)
    for _ in range(50):
        assert a.param_groups[0]["lr"] == pytest.approx(b.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        a.step(), b.step(), ours.step(), theirs.step()


def test_zero_warmup_and_warmup_equal_total():
    assert lemon_lr_factor(0, warmup_steps=0, total_steps=10) == 1.0
    assert lemon_lr_factor(3, warmup_steps=10, total_steps=10, min_lr_ratio=0.2) == pytest.approx(0.3)
    assert lemon_lr_factor(10, warmup_steps=10, total_steps=10, min_lr_ratio=0.2) == 0.2


def test_state_dict_round_trip():
    opt = _opt(1e-3)
    sched = lemon_schedule(opt, warmup_steps=5, total_steps=40, min_lr_ratio=0.05)
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    state = torch.load(_save(state), weights_only=False)  # through bytes, like a checkpoint

    opt2 = _opt(1e-3)
    opt2.load_state_dict(opt.state_dict())
    sched2 = lemon_schedule(opt2, warmup_steps=5, total_steps=40, min_lr_ratio=0.05)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 17
    assert sched2.get_last_lr() == sched.get_last_lr()
    for _ in range(30):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_whole_scheduler_pickles():
    sched = lemon_schedule(_opt(), warmup_steps=1, total_steps=3)
    torch.load(_save(sched), weights_only=False)  # a closure lambda would fail here


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(warmup_steps=-1, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=2.5, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=True, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=0, total_steps=0), "total_steps"),
        (dict(warmup_steps=11, total_steps=10), "warmup_steps"),
        (dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(warmup_steps=1, total_steps=10, min_lr_ratio=float("nan")), "min_lr_ratio"),
        (dict(warmup_steps=1, total_steps=10, decay="step"), "decay"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(LemonError, match=name):
        lemon_schedule(_opt(), **kwargs)
    assert issubclass(LemonError, ValueError)


def test_bad_optimizer():
    with pytest.raises(LemonError, match="optimizer"):
        lemon_schedule(object(), warmup_steps=0, total_steps=1)


def test_total_steps():
    assert lemon_total_steps(220_000, 0.6) == 132_000  # the paper's BERT budget
    assert lemon_total_steps(10, 0.3) == 3  # no float round-up to 4
    assert lemon_total_steps(10, 0.31) == 4  # rounded up, never below the asked fraction
    assert lemon_total_steps(3, 0.01) == 1
    for bad, name in [((0, 0.5), "scratch_total_steps"), ((10, 0.0), "budget_ratio"),
                      ((10, 1.5), "budget_ratio"), ((10, "0.5"), "budget_ratio")]:
        with pytest.raises(LemonError, match=name):
            lemon_total_steps(*bad)
