"""Training after expansion: ``train`` (AdamW, LEMON schedule, clipping, accumulation, eval,
exact-resume checkpoints, JSONL metrics, DDP / FSDP2), and its parts."""
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .loop import TrainResult, compute_loss, evaluate, train
from .optim import build_adamw, decay_groups

__all__ = ["train", "evaluate", "TrainConfig", "TrainResult", "compute_loss", "build_adamw", "decay_groups",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint"]
