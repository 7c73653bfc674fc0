"""lemon_ext: lossless LEMON expansion of pretrained transformers, and training after it."""
from .errors import LemonError

__version__ = "0.1.0"
__all__ = ["LemonError", "__version__"]
