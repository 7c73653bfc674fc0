"""The registry of family tables: one module per family in ``families/``, data only.

Adding a family is adding a module there (a table in the vocabulary of ``schema.py`` and
``roles.py``), its line below, and its tests. Tensors are mapped by role, never by shape (two
roles can share a shape). Post-LN depth: ``post_ln_positions`` tags the norms after attention
(``ln_attn``) and at the block output (``ln_out``).
"""
from __future__ import annotations

from .families.bert import BERT
from .families.gemma import GEMMA2, GEMMA3_TEXT
from .families.gpt2 import GPT2
from .families.gpt_neox import GPT_NEOX
from .families.llama import LLAMA
from .families.mixtral import MIXTRAL
from .families.olmo2 import OLMO2
from .families.phi3 import PHI3
from .families.qwen3 import QWEN3
from .families.qwen_moe import QWEN2_MOE, QWEN3_MOE
from .families.vit import VIT

ARCHITECTURES = (LLAMA, GPT2, BERT, VIT, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, PHI3, GPT_NEOX,
                 OLMO2, GEMMA2, GEMMA3_TEXT)
