"""Session-wide test setup.

Triton decides when ``triton.language`` is first imported whether ``@triton.jit`` functions are
interpreted, and torch.compile or transformers may import it before any Triton test module runs:
so the interpreter switch for GPU-less machines is set here, before collection.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
