"""Target-size arguments and model wrappers at the engine's entry points: one-line LemonErrors
naming the field instead of library tracebacks; a torch.compile'd model expands like its original."""
import pytest
import torch

import lemon_ext
from lemon_ext.errors import LemonError

transformers = pytest.importorskip("transformers")


def tiny_llama():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=4, num_hidden_layers=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


def _one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


def test_config_class_validation_is_a_lemon_error_naming_the_fields():
    # Llama keeps head_dim explicit, so 6 heads x 8 = 48 != 64 passes lemon_ext's own checks;
    # transformers' LlamaConfig validator refuses it (it raised StrictDataclassClassValidationError)
    model = tiny_llama()
    for call in (lambda: lemon_ext.plan_expansion(model.config, hidden_size=64, num_attention_heads=6),
                 lambda: lemon_ext.expand_model(model, hidden_size=64, num_attention_heads=6)):
        with pytest.raises(LemonError) as info:
            call()
        text = _one_line(info)
        assert "LlamaConfig" in text and "num_attention_heads=6" in text and "not a multiple" in text


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"])
@pytest.mark.parametrize("bad", ["64", 64.0, True])
def test_sizes_must_be_ints(field, bad):
    with pytest.raises(LemonError, match=rf"^{field} must be an int, got") as info:
        lemon_ext.plan_expansion(tiny_llama().config, **{field: bad})
    _one_line(info)


@pytest.mark.parametrize("bad", ["2", 2.0, True])
def test_layers_must_be_an_int_in_expand_model(bad):
    with pytest.raises(LemonError, match=r"^num_hidden_layers must be an int"):
        lemon_ext.expand_model(tiny_llama(), num_hidden_layers=bad)


def test_numpy_ints_are_ints():
    np = pytest.importorskip("numpy")
    plan = lemon_ext.plan_expansion(tiny_llama().config, hidden_size=np.int64(64))
    assert plan.target_sizes.hidden == 64


def test_compiled_model_expands_through_its_original():
    model = tiny_llama()
    compiled = torch.compile(model)  # wraps lazily: nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    got = lemon_ext.expand_model(compiled, hidden_size=64, num_hidden_layers=2, seed=3)
    want = lemon_ext.expand_model(model, hidden_size=64, num_hidden_layers=2, seed=3)
    assert type(got) is type(model)
    sd_got, sd_want = got.state_dict(), want.state_dict()
    assert sd_got.keys() == sd_want.keys()
    for name in sd_want:
        assert torch.equal(sd_got[name], sd_want[name]), name
