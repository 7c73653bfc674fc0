"""The checks the family tests share (tests/test_family_*.py, tests/test_hub_forms.py,
tests/test_engine_storage.py), each written once:

- storage dtype: :func:`assert_bf16_split_groups_exact` (every split group of a bf16 source sums
  in fp32 to the stored value), :func:`assert_cpu_backend_bitwise` (backend="cpu" equals
  backend="torch" bit for bit), :func:`check_triton_one_tensor`;
- function: :func:`lossless_error`, :func:`output_errors`, :func:`layer_io`;
- symmetry and training: :func:`assert_rows_distinct`, :func:`adamw_steps`,
  :func:`assert_new_layer_learns`, :func:`check_optimizer_state`;
- checkpoints in a Hub on-disk form (tests/hub_forms*.py): :class:`ExpandedForms`,
  :func:`check_expanded`, :func:`dropped_of`, :func:`assert_spelling_kept`,
  :func:`assert_expand_state_dict_equals_files`, :func:`assert_typo_refused`, and all of them in
  :func:`check_hub_form`.

The tiny models themselves are built by tests/helpers_engine.py (:func:`helpers_engine.build`:
float64, every parameter perturbed) and the fixture directories by tests/hub_forms.py.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable

import pytest
import torch

import lemon_ext
from helpers_engine import VOCAB, relative_error, token_batch
from hub_forms import HubForm, is_derived, load_reference, read_tensors, rewrite_with, stored_names, template

#: The seed of every expand_checkpoint / expand_state_dict of a Hub form.
SEED = 3


def tokens(vocab: int = VOCAB, seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    """The family tests' token batch: seeded ids below ``vocab``, 2 x 9 by default."""
    return token_batch(seed=seed, batch=batch, length=length, vocab=vocab)


def lossless_error(source, target, vocab: int) -> float:
    """Largest relative logits error of ``target`` against ``source`` on one token batch, without
    and with a left-padded attention mask."""
    x = tokens(vocab)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        return max(relative_error(source(x).logits, target(x).logits),
                   relative_error(source(x, attention_mask=mask).logits, target(x, attention_mask=mask).logits))


def layer_io(model, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) hidden states of ``model.model.layers[index]`` in one forward pass on ``x``."""
    seen = {}
    hook = model.model.layers[index].register_forward_hook(
        lambda m, args, kwargs, out: seen.update(i=args[0] if args else kwargs["hidden_states"], o=out),
        with_kwargs=True)
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen["i"], seen["o"][0] if isinstance(seen["o"], tuple) else seen["o"]


# -- storage dtype: bf16 split groups, backends ------------------------------------------------------

def group_sums(spec, split_tensor: torch.Tensor, unsplit_tensor: torch.Tensor):
    """Sums of the stored parts of every split group and the stored unsplit values they must equal.

    Both tensors are in the op's (R_T, C_T) view (transposed for Conv1D, one row for a vector):
    columns sharing a source column form a group. Returns (sums, expected), each (R_T, C_S) over
    the split columns, accumulated in fp32 (fp64 for fp64 tensors) in column order (index_add_ on
    CPU adds in index order), as a bf16 checkpoint's user would sum them."""
    t = split_tensor.reshape(-1, split_tensor.shape[-1]) if not spec.transpose else split_tensor.t()
    u = unsplit_tensor.reshape(t.shape) if not spec.transpose else unsplit_tensor.t()
    if spec.view == "vector":
        t, u = t.reshape(1, -1), u.reshape(1, -1)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp32 sums for 16-bit parts
    cols = spec.col_map
    valid = cols >= 0
    src_cols = cols[valid]
    sums = torch.zeros(t.shape[0], int(src_cols.max()) + 1, dtype=acc)
    sums.index_add_(1, src_cols, t[:, valid].to(acc))
    expected = torch.zeros_like(sums)
    expected[:, src_cols] = u[:, valid].to(acc)
    return sums, expected


def assert_bf16_split_groups_exact(config, sd_bf16: dict, **sizes) -> list:
    """The plan of ``config`` for the bf16 state dict ``sd_bf16`` at ``sizes``: every split tensor
    stays bf16 and each of its split groups sums in fp32 exactly to the stored (bf16) unsplit target
    value (a new layer's cancelling groups to zero). Returns the specs checked (callers bound how
    many, or which roles)."""
    plan = lemon_ext.plan_expansion(config, source_shapes={k: v.shape for k, v in sd_bf16.items()}, **sizes)
    checked = []
    for spec in plan.specs:
        if spec.split == "none":
            continue
        src = sd_bf16[spec.source]
        split = spec.execute(src, seed=3)
        assert split.dtype == torch.bfloat16, spec.name
        sums, expected = group_sums(spec, split, spec.execute(src, seed=3, split="none"))
        if spec.split.startswith("cancel"):
            expected = torch.zeros_like(expected)
        assert torch.equal(sums, expected), spec.name
        checked.append(spec)
    return checked


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(got: dict, want: dict) -> None:
    """``got`` holds exactly ``want``'s names, each tensor with the same dtype, shape, values
    (torch.equal) and bytes."""
    assert sorted(got) == sorted(want), {"only in got": sorted(set(got) - set(want)),
                                         "only in want": sorted(set(want) - set(got))}
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, (k, got[k].dtype, v.dtype, got[k].shape, v.shape)
        assert torch.equal(got[k], v) and torch.equal(_bytes(got[k]), _bytes(v)), k


def assert_cpu_backend_bitwise(sd_bf16: dict, config, seed: int = 5, **sizes) -> None:
    """backend="cpu" gives backend="torch"'s state dict bit for bit on a bf16 source, every tensor
    bf16; skips the test when the C++ backend is not built."""
    if lemon_ext.backends().get("cpu") is not None:
        pytest.skip(f"C++ backend not built: {lemon_ext.backends()['cpu']}")
    ref, _ = lemon_ext.expand_state_dict(sd_bf16, config, backend="torch", seed=seed, **sizes)
    out, _ = lemon_ext.expand_state_dict(sd_bf16, config, backend="cpu", seed=seed, **sizes)
    assert all(t.dtype == torch.bfloat16 for t in ref.values()), {k: t.dtype for k, t in ref.items()}
    assert_same_tensors(out, ref)


def check_triton_one_tensor(spec, source: torch.Tensor) -> bool:
    """One small spec through the Triton backend (interpreter on CPU): within 1 ulp of torch
    (False: no Triton backend)."""
    if lemon_ext.backends().get("triton") is not None:
        return False
    ref = spec.execute(source, seed=5, backend="torch")
    out = spec.execute(source, seed=5, backend="triton")
    ulp = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= ulp).all(), spec.name
    return True


# -- symmetry breaking and training ----------------------------------------------------------------

def assert_rows_distinct(weight: torch.Tensor, name: str) -> float:
    """No two rows (neurons, head rows) identical; returns the smallest max-abs difference between rows."""
    w = weight.detach().double().reshape(weight.shape[0], -1)
    d = torch.cdist(w, w, p=float("inf"))
    d.fill_diagonal_(math.inf)
    smallest = float(d.min())
    assert smallest > 0, f"{name}: two identical rows"
    return smallest


def assert_ffn_neurons_distinct(model) -> None:
    """In every layer of ``model.model.layers`` (originals and new ones) no two FFN neurons have the
    same ``up_proj`` row or the same ``gate_proj`` row."""
    for i, layer in enumerate(model.model.layers):
        assert_rows_distinct(layer.mlp.up_proj.weight, f"layers.{i}.up_proj")
        assert_rows_distinct(layer.mlp.gate_proj.weight, f"layers.{i}.gate_proj")


def adamw_steps(model, *batches: torch.Tensor, opt=None):
    """``model.train()``, then one AdamW step (lr 1e-3; ``opt`` if given) on the LM loss of each
    batch on itself; returns the optimizer."""
    model.train()
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x in batches:
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def assert_new_layer_learns(target, index: int, x: torch.Tensor) -> None:
    """New layer ``index`` of ``target`` (zero branch-norm gains): the first backward gives both
    branch norms' gains a gradient everywhere (the branches are live copies); after one AdamW step
    every parameter of the layer gets a gradient."""
    target.train()
    opt = torch.optim.AdamW(target.parameters(), lr=1e-3)
    target(x, labels=x).loss.backward()
    new = target.model.layers[index]
    assert float(new.post_attention_layernorm.weight.grad.abs().min()) > 0
    assert float(new.post_feedforward_layernorm.weight.grad.abs().min()) > 0
    opt.step()
    opt.zero_grad()
    target(x, labels=x).loss.backward()
    for name, p in new.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name


def check_optimizer_state(model_s, sizes: dict, vocab: int, seed: int = 4) -> dict:
    """Two AdamW steps on the source, expand model and optimizer; returns per-check numbers.

    The grown moments follow the weights: in every split tensor the target's exp_avg summed over
    each split group equals the source's exp_avg at the mapped row (times the row factor), as the
    weights do; every stateful source parameter's target has state of its shape; one more step
    on the target runs and stays finite."""
    from lemon_ext.optim_state import expand_optimizer_state

    opt = adamw_steps(model_s, tokens(vocab, seed=10), tokens(vocab, seed=11))
    model_s.eval()
    model_t = lemon_ext.expand_model(model_s, seed=seed, **sizes)
    opt_t = expand_optimizer_state(opt, model_s, model_t, seed=seed, **sizes)
    plan = lemon_ext.plan_expansion(model_s.config, seed=seed,
                                    source_shapes={k: v.shape for k, v in model_s.state_dict().items()}, **sizes)
    params_s = dict(model_s.named_parameters())
    params_t = dict(model_t.named_parameters(remove_duplicate=False))
    worst, checked = 0.0, 0
    for spec in plan.specs:
        p_t = params_t.get(spec.name)
        p_s = params_s.get(spec.source or "")
        if p_t is None or p_s is None or p_s not in opt.state:
            continue
        st_s, st_t = opt.state[p_s], opt_t.state[p_t]
        assert st_t["exp_avg"].shape == p_t.shape and st_t["exp_avg_sq"].shape == p_t.shape, spec.name
        assert float(st_t["step"]) == float(st_s["step"]), spec.name
        if spec.split == "none" or spec.view != "rows" or spec.transpose or len(spec.source_shape) != 2:
            continue
        ea_t = st_t["exp_avg"].double()
        sums, _ = group_sums(spec, ea_t, ea_t)  # sums over each split group
        rows = spec.row_map
        keep = rows >= 0
        want = st_s["exp_avg"].double()[rows.clamp(min=0)][:, : sums.shape[1]]
        if spec.row_factor is not None:
            want = want * spec.row_factor.unsqueeze(1)
        if spec.col_factor is not None:  # one factor for every column of these roles
            want = want * float(spec.col_factor[0])
        if spec.split == "cancel":
            want = torch.zeros_like(want)
        scale = float(st_s["exp_avg"].abs().max()) or 1.0
        err = float((sums[keep] - want[keep]).abs().max()) / scale
        worst = max(worst, err)
        checked += 1
    assert checked >= 5, checked
    assert worst <= 1e-12, worst
    model_t.train()
    x = tokens(vocab, seed=20)
    loss = model_t(x, labels=x).loss
    loss.backward()
    opt_t.step()
    assert all(torch.isfinite(p).all() for p in model_t.parameters())
    return {"moment_tensors_checked": checked, "moment_group_sum_error": worst, "loss": loss.item()}


# -- checkpoints in a Hub on-disk form ---------------------------------------------------------------

class ExpandedForms:
    """Fixture forms (``makers``: name -> builder(root)) built once under ``root`` and each expanded
    once by expand_checkpoint (seed :data:`SEED`, target ``form.sizes``) into ``root/out_<name>``.

    ``form(name)`` -> HubForm; ``expanded(name)`` -> (form, dst, report). An expansion that raises
    fails each test that asks for its output, with the engine's message."""

    def __init__(self, root: str, makers: dict[str, Callable[[str], HubForm]], seed: int = SEED):
        self.root, self.makers, self.seed = str(root), makers, seed
        self._forms: dict[str, HubForm] = {}
        self._out: dict = {}

    def form(self, name: str) -> HubForm:
        if name not in self._forms:
            self._forms[name] = self.makers[name](self.root)
        return self._forms[name]

    def expanded(self, name: str):
        from lemon_ext.checkpoint import expand_checkpoint

        form = self.form(name)
        if name not in self._out:
            dst = os.path.join(self.root, "out_" + name)
            try:
                report = expand_checkpoint(form.path, dst, seed=self.seed, progress=False, **form.sizes)
                self._out[name] = (dst, report, None)
            except Exception as e:  # noqa: BLE001 - reported by every test that needs the output
                self._out[name] = (dst, None, e)
        dst, report, err = self._out[name]
        if err is not None:
            pytest.fail(f"expand_checkpoint({name}) raised {type(err).__name__}: {err}", pytrace=False)
        return form, dst, report


def output_errors(form: HubForm, model_t, seeds=(0, 1)) -> dict[str, float]:
    """Max relative error per output field of ``model_t`` against the form's reference; a
    hidden-size field (BertModel) is compared on every one of the target's k source-sized copies
    (V_circ: replicated channels)."""
    errors: dict[str, float] = {}
    with torch.no_grad():
        for seed in seeds:
            inputs = form.make_inputs(seed)
            out_s, out_t = form.model(**inputs), model_t(**inputs)
            for field in form.outputs:
                a, b = getattr(out_s, field), getattr(out_t, field)
                if a.shape == b.shape:
                    err = relative_error(a, b)
                else:
                    d = a.shape[-1]
                    assert a.shape[:-1] == b.shape[:-1] and b.shape[-1] % d == 0, (field, a.shape, b.shape)
                    err = max(relative_error(a, b[..., i * d:(i + 1) * d]) for i in range(b.shape[-1] // d))
                errors[field] = max(errors.get(field, 0.0), err)
    return errors


def check_expanded(form: HubForm, dst: str, load: Callable | None = None):
    """The expanded directory ``dst`` loads with the form's class in float64 with nothing missing,
    unexpected or mismatched (``load(model_class, dst)``; default :func:`hub_forms.load_reference`
    tolerating nothing). Returns (the model, its largest relative output error)."""
    model_t, _ = (load or (lambda cls, path: load_reference(cls, path, tolerate=None)))(form.model_class, dst)
    return model_t, max(output_errors(form, model_t).values())


def report_of(dst: str) -> dict:
    """The lemon_expansion.json of an expanded directory."""
    with open(os.path.join(dst, "lemon_expansion.json")) as f:
        return json.load(f)


def dropped_of(dst: str) -> list[dict]:
    """The report's "dropped_tensors": a list of {"name": str, "reason": non-empty str}."""
    rep = report_of(dst)
    assert "dropped_tensors" in rep, f"{dst}/lemon_expansion.json has no 'dropped_tensors' (keys: {sorted(rep)})"
    dropped = rep["dropped_tensors"]
    assert isinstance(dropped, list), dropped
    for d in dropped:
        assert isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("reason"), str) \
            and d["reason"].strip(), f"bad dropped_tensors entry {d!r}"
    return dropped


def assert_spelling_kept(form: HubForm, dst: str, dropped) -> None:
    """Every output name is spelled as in the source: the same name templates (:func:`hub_forms.template`)
    as the source's stored names less ``dropped``."""
    src = {template(n) for n in stored_names(form.path) if n not in dropped}
    out = {template(n) for n in stored_names(dst)}
    assert out == src, {"only in output": sorted(out - src), "only in source": sorted(src - out)}


def assert_expand_state_dict_equals_files(form: HubForm, dst: str, seed: int = SEED) -> None:
    """expand_state_dict on the tensors as read from the source files (load_file / torch.load)
    gives what expand_checkpoint wrote to ``dst`` (same seed), byte for byte."""
    sd_t, _ = lemon_ext.expand_state_dict(read_tensors(form.path), form.config, seed=seed, **form.sizes)
    assert_same_tensors(read_tensors(dst), sd_t)


def assert_typo_refused(form: HubForm, tmp: str, seed: int = SEED) -> None:
    """The form with its ``typo`` tensor misspelled (a copy under ``tmp``) is refused with a
    LemonError naming the misspelling, by expand_checkpoint (writing nothing) and by expand_state_dict."""
    from lemon_ext.checkpoint import expand_checkpoint

    old, new = form.typo
    bad = rewrite_with(form, os.path.join(tmp, form.name + "_typo"), {old: new})
    dst = os.path.join(tmp, form.name + "_typo_out")
    with pytest.raises(lemon_ext.LemonError) as e:
        expand_checkpoint(bad, dst, seed=seed, progress=False, **form.sizes)
    assert new in str(e.value), str(e.value)
    assert not os.path.exists(dst)
    with pytest.raises(lemon_ext.LemonError) as e:
        lemon_ext.expand_state_dict(read_tensors(bad), form.config, seed=seed, **form.sizes)
    assert new in str(e.value), str(e.value)


def assert_planned_shapes_stored(form: HubForm) -> None:
    """Planned from config.json alone (no names), the expected source tensors are exactly the
    stored ones (aliases aside), in table spelling, with the stored shapes."""
    from lemon_ext.arch import SourceSpelling, find_architecture

    src_names = stored_names(form.path)
    spelling = SourceSpelling(find_architecture(form.config), src_names)
    stored = {spelling.canonical[n]: n for n in src_names if n in spelling.canonical and n not in form.aliases}
    expected = lemon_ext.plan_expansion(form.config, **form.sizes).expected_source_shapes()
    assert set(expected) == set(stored), sorted(set(expected) ^ set(stored))
    sources = read_tensors(form.path)
    assert all(tuple(sources[stored[n]].shape) == tuple(shape) for n, shape in expected.items())


def check_hub_form(form: HubForm, tmp: str, seed: int = SEED, derived: Callable[[str], bool] = is_derived) -> dict:
    """expand_checkpoint on the form: the output loads with from_pretrained with empty loading
    info, reproduces the source's outputs, keeps its spelling, drops (and reports) exactly its
    derived buffers (no name ``derived`` is left), equals expand_state_dict on the files' tensors
    byte for byte, and a misspelled tensor is refused by name.
    Returns {"error": max relative error, "dropped": [...], "model_t": ..., "dst": ...}."""
    from lemon_ext.checkpoint import expand_checkpoint

    dst = os.path.join(tmp, form.name + "_out")
    report = expand_checkpoint(form.path, dst, seed=seed, progress=False, **form.sizes)
    assert report["plan_summary"]["hidden"][1] == form.sizes["hidden_size"]
    model_t, error = check_expanded(form, dst)
    dropped = [d["name"] for d in dropped_of(dst)]
    assert sorted(dropped) == sorted(form.derived), dropped
    assert_planned_shapes_stored(form)
    assert_spelling_kept(form, dst, dropped)
    assert not [n for n in stored_names(dst) if derived(n)]
    assert_expand_state_dict_equals_files(form, dst, seed)
    assert_typo_refused(form, tmp, seed)
    return {"error": error, "dropped": dropped, "model_t": model_t, "dst": dst}
