"""Training after expansion: ``train`` (AdamW, LEMON schedule, clipping, accumulation, eval,
exact-resume checkpoints, metrics to JSONL / TensorBoard / callbacks, DDP / FSDP2, export to a
Hugging Face directory), and its parts."""
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import collate_rows
from .export import export_pretrained
from .loop import TrainResult, compute_loss, evaluate, train
from .metrics import TensorBoardLogger
from .optim import build_adamw, decay_groups

__all__ = ["train", "evaluate", "TrainConfig", "TrainResult", "compute_loss", "build_adamw", "decay_groups",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint", "collate_rows", "export_pretrained",
           "TensorBoardLogger"]
