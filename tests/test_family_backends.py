"""Every role of every family through the Triton kernel (interpreter on CPU): one tensor per role,
bf16, within 1 ulp of the torch reference; the C++ backend bit for bit. The per-family files test
the C++ backend on whole models; this covers the roles (fused segments, stacked experts, q/k eta
rows, offset norms, scaled embeddings) on the Triton path."""
from __future__ import annotations

import pytest
import torch

import family_checks as C
import helpers_engine as H
import lemon_ext


def _models():
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=38, vocab_size=H.VOCAB)
    moe = dict(num_experts_per_tok=2)
    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**small)),
        "gpt2": lambda: tf.GPT2LMHeadModel(H.gpt2_config()),
        "bert": lambda: tf.BertForMaskedLM(H.bert_config()),
        "vit": lambda: tf.ViTForImageClassification(H.vit_config()),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, head_dim=16)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**small, pad_token_id=0)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            **{k: v for k, v in small.items() if k != "num_key_value_heads"}, rotary_pct=0.5)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**small, pad_token_id=0)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, head_dim=8, pad_token_id=0)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**small, head_dim=8, pad_token_id=0)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**small, num_local_experts=4, **moe)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **small, head_dim=16, num_experts=4, moe_intermediate_size=12, **moe)),
        "qwen2_moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **small, num_experts=4, moe_intermediate_size=12, shared_expert_intermediate_size=20, **moe)),
    }


#: an integer and an indivisible width (the latter brings eta factors, tails and offsets in);
#: OLMo 2 grows heads by integer multiples only: at 1.5x its heads double (attention 64 wide).
SIZES = {"2x": dict(hidden_size=64, num_hidden_layers=3), "1.5x": dict(hidden_size=48, num_hidden_layers=3)}
POST_LN = {"bert"}  # Post-LN: exact only at integer widths (1.5x needs allow_lossy)


@pytest.mark.parametrize("width", sorted(SIZES))
@pytest.mark.parametrize("family", sorted(_models()))
def test_every_role_on_triton_and_cpu(family, width):
    torch.manual_seed(0)
    model = _models()[family]()
    sd = {n: (t.detach() + 0.05 * torch.randn_like(t)).to(torch.bfloat16) if t.is_floating_point() else t
          for n, t in model.state_dict().items()}
    sizes = dict(SIZES[width])
    if family == "olmo2" and width == "1.5x":
        sizes.update(num_attention_heads=8, num_key_value_heads=4)
    if family in POST_LN and width == "1.5x":
        sizes["allow_lossy"] = True
    plan = lemon_ext.plan_expansion(model.config, source_shapes={n: t.shape for n, t in sd.items()}, **sizes)
    one_per_role = {}
    for spec in plan.specs:
        if spec.source is not None:
            one_per_role.setdefault((spec.role, spec.split, spec.offset != 0.0, spec.row_factor is not None), spec)
    assert len(one_per_role) >= 6
    for spec in one_per_role.values():
        if not C.check_triton_one_tensor(spec, sd[spec.source]):
            pytest.skip(f"triton: {lemon_ext.backends()['triton']}")
        if lemon_ext.backends().get("cpu") is None:
            torch.testing.assert_close(spec.execute(sd[spec.source], seed=5, backend="cpu"),
                                       spec.execute(sd[spec.source], seed=5, backend="torch"), rtol=0, atol=0)
