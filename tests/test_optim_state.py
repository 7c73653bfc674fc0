"""expand_optimizer_state: AdamW moments grown with the weights; the first update after growth
matches the closed-form AdamW update from the grown state (CPU, float32 state, float64 checks)."""
import pytest
import torch

import lemon_ext
from lemon_ext.errors import LemonError
from lemon_ext.optim_state import expand_optimizer_state
from lemon_ext.train.optim import build_adamw

transformers = pytest.importorskip("transformers")

D_S, L_S, V = 16, 1, 32
KW = dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, seed=7)
LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.99), 1e-8


def source_and_optimizer():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=8, n_embd=D_S, n_layer=L_S, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = build_adamw(model, lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)
    for i in range(3):  # 3 steps: moments nonzero, step = 3
        x = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(i))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture(scope="module")
def grown():
    model_s, opt_s = source_and_optimizer()
    model_t = lemon_ext.expand_model(model_s, **KW)
    opt_t = expand_optimizer_state(opt_s, model_s, model_t, **KW)
    return model_s, opt_s, model_t, opt_t


def _st(opt, model, name):
    return opt.state[dict(model.named_parameters(remove_duplicate=False))[name]]


def test_moments_follow_hand_derived_maps(grown):
    model_s, opt_s, model_t, opt_t = grown
    W_s, W_t = model_s.state_dict(), model_t.state_dict()
    S = lambda n: _st(opt_s, model_s, n)  # noqa: E731
    T = lambda n: _st(opt_t, model_t, n)  # noqa: E731
    j = torch.arange(2 * D_S) % D_S  # circular map of the hidden axis (k = 2, r = 0)
    n = torch.arange(128) % 64  # MLP neurons

    # norm gain, copied (eta = 1): moments copied; the tied head's final norm is scaled by 1/k = 1/2
    for name, c in [("transformer.h.0.ln_1.weight", 1.0), ("transformer.h.1.ln_2.bias", 1.0),
                    ("transformer.ln_f.weight", 0.5)]:
        src = name.replace("h.1.", "h.0.")
        torch.testing.assert_close(W_t[name], c * W_s[src][j])
        torch.testing.assert_close(T(name)["exp_avg"], c * S(src)["exp_avg"][j])
        torch.testing.assert_close(T(name)["exp_avg_sq"], c * c * S(src)["exp_avg_sq"][j])

    # embedding (tied with the LM head): V_avg along hidden = copies when k divides
    torch.testing.assert_close(T("transformer.wte.weight")["exp_avg"], S("transformer.wte.weight")["exp_avg"][:, j])

    # MLP up (Conv1D, stored (in, out)): fan-in split over the two copies of each input column,
    # neurons replicated. alpha = W_T / W_S[g] is the split coefficient of each part.
    name = "transformer.h.0.mlp.c_fc.weight"
    gathered = W_s[name][j][:, n]
    alpha = W_t[name] / gathered
    torch.testing.assert_close(W_t[name][:D_S] + W_t[name][D_S:], W_s[name][:, n])  # parts sum to W
    assert (alpha - 0.5).abs().max() > 0.01  # LEMON: unequal parts
    torch.testing.assert_close(T(name)["exp_avg"], alpha * S(name)["exp_avg"][j][:, n], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(T(name)["exp_avg_sq"], alpha ** 2 * S(name)["exp_avg_sq"][j][:, n], rtol=1e-5, atol=1e-12)
    m = T(name)["exp_avg"]
    torch.testing.assert_close(m[:D_S] + m[D_S:], S(name)["exp_avg"][:, n], rtol=1e-5, atol=1e-9)

    # new layer 1's MLP down projection (copy of layer 0 with zero output): its neurons come in
    # adjacent identical pairs (2p, 2p+1 read source neuron 2p mod 64) with +e / -e down rows, so
    # the moments cancel the same way (the new block's update starts zero-sum too)
    name_t, name_s = "transformer.h.1.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"
    m = T(name_t)["exp_avg"]
    pairs = (torch.arange(128) // 2 * 2) % 64
    torch.testing.assert_close(W_t[name_t][0::2] + W_t[name_t][1::2], torch.zeros(64, 2 * D_S), atol=1e-7, rtol=0)
    torch.testing.assert_close(m[0::2] + m[1::2], torch.zeros(64, 2 * D_S), atol=1e-9, rtol=0)
    assert (W_t[name_t].abs().sum(dim=1) > 0).all()  # every new neuron has a non-zero fan-out
    alpha = W_t[name_t] / W_s[name_s][pairs][:, j]
    torch.testing.assert_close(m, alpha * S(name_s)["exp_avg"][pairs][:, j], rtol=1e-5, atol=1e-9)

    # step counts kept
    for p_t, st in opt_t.state.items():
        assert int(st["step"]) == 3


def test_first_update_matches_closed_form(grown):
    _, _, model_t, opt_t = grown
    x = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(42))
    model_t.zero_grad()
    model_t(input_ids=x, labels=x).loss.backward()
    before = {}
    for group in opt_t.param_groups:
        for p in group["params"]:
            st = opt_t.state[p]
            before[p] = (p.detach().double().clone(), p.grad.double().clone(), st["exp_avg"].double().clone(),
                         st["exp_avg_sq"].double().clone(), float(st["step"]), group["weight_decay"], group["lr"])
    opt_t.step()
    b1, b2 = BETAS
    changed_vs_fresh = 0
    for p, (p0, g, m, v, t, wd, lr) in before.items():
        t1 = t + 1
        m1 = b1 * m + (1 - b1) * g
        v1 = b2 * v + (1 - b2) * g * g
        expect = p0 * (1 - lr * wd) - lr * (m1 / (1 - b1 ** t1)) / ((v1 / (1 - b2 ** t1)).sqrt() + EPS)
        torch.testing.assert_close(p.detach().double(), expect, rtol=1e-5, atol=1e-7)
        fresh = p0 * (1 - lr * wd) - lr * g.sign() * (g.abs() > 0)  # AdamW's first step from empty state
        changed_vs_fresh += int(not torch.allclose(expect, fresh, atol=1e-4))
    assert changed_vs_fresh == len(before)  # the grown state, not a fresh one, drove every update
    assert len(before) == len(list(model_t.parameters()))  # tied head: one parameter, one state


def test_groups_keep_weight_decay_roles(grown):
    _, _, model_t, opt_t = grown
    names = {id(p): n for n, p in model_t.named_parameters()}
    decayed = {names[id(p)] for g in opt_t.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed and all(n.endswith(".weight") and ".ln_" not in n and "wte" not in n and "wpe" not in n
                           for n in decayed)


def test_rejects_non_adam():
    model_s, _ = source_and_optimizer()
    with pytest.raises(LemonError, match="optimizer_s"):
        expand_optimizer_state(torch.optim.SGD(model_s.parameters(), lr=0.1), model_s, model_s, **KW)
