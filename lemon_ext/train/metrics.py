"""Where training records go: ``metrics.jsonl``, TensorBoard, user callbacks (rank 0 only).

A record is a flat dict. Training records (every ``log_every`` optimizer steps)::

    {"step", "loss", "loss_mean", "lr", "grad_norm", "tokens", "tokens_per_s", "examples_per_s",
     "epoch", "time", **extra}

``loss`` is the global mean loss of the step ``step``, ``loss_mean`` the mean over the steps since
the previous record, ``tokens`` the global count of tokens trained on so far in this call
(``attention_mask`` ones, else ``input_ids`` entries; ``None`` for batches without either), the
rates are global and measured over training time only (evaluation and checkpoints excluded).
Evaluation records: ``{"step", "eval_loss", "time", **extra}``.
"""
from __future__ import annotations

import json
import os

from ..errors import LemonError

__all__ = ["JsonlMetrics", "TensorBoardLogger", "tensorboard_available", "resolve_tensorboard"]


class JsonlMetrics:
    """``out_dir/metrics.jsonl``. On resume, lines past the resumed step (logged after the last
    checkpoint by the interrupted run) are dropped so the file reads as one uninterrupted run."""

    def __init__(self, out_dir: str, resume_step: int):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
            with open(self.path, "w") as f:
                f.writelines(keep if resume_step > 0 else [])

    def __call__(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self):
        pass


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return False
    return True


class TensorBoardLogger:
    """Scalars of every record under ``train/<key>`` or ``eval/<key>`` at x = ``step``.

    ``writer`` defaults to ``torch.utils.tensorboard.SummaryWriter(log_dir)``; any object with
    ``add_scalar(tag, value, step)``, ``flush()`` and ``close()`` works (tests pass a stand-in).
    """

    def __init__(self, log_dir: str, writer=None):
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir)
        self.writer = writer

    def __call__(self, record: dict):
        prefix = "eval" if "eval_loss" in record else "train"
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def resolve_tensorboard(setting, out_dir: str | None) -> str | None:
    """The TensorBoard log dir for ``TrainConfig.tensorboard``, or None (off).

    ``"auto"``: ``out_dir/tensorboard`` when the tensorboard package is installed and ``out_dir``
    is set; ``True``: the same but required; ``False``: off; a string: that directory.
    """
    if setting is False or setting is None:
        return None
    if setting == "auto":
        return os.path.join(out_dir, "tensorboard") if out_dir and tensorboard_available() else None
    if setting is True and not out_dir:
        raise LemonError("tensorboard=True needs out_dir (or pass tensorboard='path/to/logdir')")
    if not tensorboard_available():
        raise LemonError("tensorboard: the tensorboard package is not installed (pip install tensorboard), "
                         "or set tensorboard=False")
    return os.path.join(out_dir, "tensorboard") if setting is True else str(setting)
