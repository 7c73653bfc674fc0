"""lemon_ext.train as a training engineer meets it: raw Hugging Face dataset rows, reruns of a
finished out_dir, another model in the same out_dir, ``lemon_ext.train`` after ``import lemon_ext``,
logging hooks (callbacks, TensorBoard), and setup errors that leave no process group behind."""
import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lemon_ext.errors import LemonError
from lemon_ext.schedule import lemon_lr_factor
from lemon_ext.train import TrainConfig, train
from lemon_ext.train.metrics import TensorBoardLogger, tensorboard_available

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 12, 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_gpt2(width=16, seed=0):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=width, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def rows(n=32, seed=1):
    x = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in x]


class RawRows:
    """Stand-in for a ``datasets.Dataset`` without ``set_format("torch")``: rows of Python lists,
    plus ``__getitems__`` (which DataLoader calls for a batch when present, as datasets defines)."""

    def __init__(self, columns: dict):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}

    def __getitems__(self, idx):
        return [self[i] for i in idx]


FAST = dict(batch_size=4, total_steps=4, lr=3e-3, progress=False, tensorboard=False)


def test_raw_dataset_rows_train_like_tensor_rows():
    data = rows()
    raw = RawRows({"input_ids": [r["input_ids"].tolist() for r in data],
                   "labels": [r["labels"].tolist() for r in data]})
    ref = train(tiny_gpt2(), data, data[:8], **FAST)
    got = train(tiny_gpt2(), raw, raw, eval_batches=2, **FAST)
    assert got.losses == ref.losses and got.evals == ref.evals


def test_real_hf_dataset():
    datasets = pytest.importorskip("datasets", reason="datasets is not a dependency: RawRows stands in for it")
    data = rows()
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in data],
                                     "labels": [r["labels"].tolist() for r in data]})
    assert train(tiny_gpt2(), data, **FAST).losses == train(tiny_gpt2(), ds, **FAST).losses


@pytest.mark.parametrize("columns, message", [
    ({"text": ["a b"] * 8}, r"^column 'text' holds strings: drop it"),
    ({"input_ids": [[1, 2, 3]] * 4 + [[1, 2]] * 4}, r"^column 'input_ids' has rows of different shapes"),
])
def test_bad_columns_name_the_column(columns, message):
    raw = RawRows({**{"input_ids": [[1, 2, 3]] * 8, "labels": [[1, 2, 3]] * 8}, **columns})
    with pytest.raises(LemonError, match=message):
        train(tiny_gpt2(), raw, **FAST)


def test_non_map_dataset_names_the_argument():
    with pytest.raises(LemonError, match="^train_data must be a map-style dataset"):
        train(tiny_gpt2(), iter(rows()), **FAST)
    with pytest.raises(LemonError, match="^eval_data is empty"):
        train(tiny_gpt2(), rows(), [], **FAST)


def test_rerunning_a_finished_run_adds_nothing(tmp_path):
    kw = dict(FAST, out_dir=str(tmp_path), eval_every=2, log_every=1)
    first = train(tiny_gpt2(), rows(), rows(8, seed=2), **kw)
    before = (tmp_path / "metrics.jsonl").read_text()
    again = train(tiny_gpt2(seed=5), rows(), rows(8, seed=2), **kw)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # no duplicate eval line
    assert again.losses == [] and again.evals == [first.evals[-1]]
    assert again.final_eval_loss == first.final_eval_loss
    evals = [json.loads(line)["step"] for line in before.splitlines() if "eval_loss" in line]
    assert evals == [2, 4]


def test_another_model_in_the_same_out_dir_names_the_tensor(tmp_path):
    train(tiny_gpt2(width=16), rows(), out_dir=str(tmp_path), **FAST)
    with pytest.raises(LemonError, match=r"^checkpoint .* tensor 'transformer.wte.weight' has shape \(40, 16\), "
                                         r"the model's is \(40, 32\): another model") as info:
        train(tiny_gpt2(width=32), rows(), out_dir=str(tmp_path), **FAST)
    assert "\n" not in str(info.value)


def test_lemon_ext_train_is_an_attribute():
    code = "import lemon_ext, sys; assert 'lemon_ext.train' not in sys.modules; print(lemon_ext.train.train.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "train", out.stderr


def test_callbacks_get_loss_lr_grad_norm_and_throughput():
    records = []
    data = rows()
    model = tiny_gpt2()
    first_batch = {k: torch.stack([r[k] for r in data[:4]]) for k in data[0]}
    # independent reference for step 1's gradient norm: the same model, batch and loss, by hand
    ref = tiny_gpt2()
    ref(**first_batch).loss.backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()])).item()

    res = train(model, data, data[:8], callbacks=[records.append], shuffle=False, warmup_steps=2, log_every=1,
                eval_every=2, max_grad_norm=None, **FAST)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [(r["step"], r["loss"]) for r in steps] == res.losses
    assert [r["lr"] for r in steps] == [3e-3 * lemon_lr_factor(s, warmup_steps=2, total_steps=4) for s in range(4)]
    assert steps[0]["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert [r["tokens"] for r in steps] == [4 * SEQ * s for s in (1, 2, 3, 4)]  # input_ids entries, no mask
    assert all(r["tokens_per_s"] > 0 and r["examples_per_s"] > 0 for r in steps)
    assert [(r["step"], r["eval_loss"]) for r in evals] == res.evals


def test_tokens_count_the_attention_mask():
    records = []
    data = [dict(r, attention_mask=torch.tensor([1] * (SEQ - 3) + [0] * 3)) for r in rows()]
    train(tiny_gpt2(), data, callbacks=[records.append], log_every=2, **FAST)
    assert [r["tokens"] for r in records] == [2 * 4 * (SEQ - 3), 4 * 4 * (SEQ - 3)]


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_logger_writes_every_numeric_field():
    writer = FakeWriter()
    log = TensorBoardLogger("unused", writer=writer)
    log({"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "epoch": 0, "run": "x"})
    log({"step": 4, "eval_loss": 2.0, "time": 1.5})
    log.close()
    assert writer.scalars == [("train/loss", 2.5, 3), ("train/lr", 1e-3, 3), ("train/epoch", 0, 3),
                              ("eval/eval_loss", 2.0, 4), ("eval/time", 1.5, 4)]
    assert writer.closed


def test_tensorboard_setting(tmp_path):
    if tensorboard_available():
        train(tiny_gpt2(), rows(), out_dir=str(tmp_path), **dict(FAST, tensorboard=True))
        assert any((tmp_path / "tensorboard").iterdir())
    else:
        with pytest.raises(LemonError, match="^tensorboard: the tensorboard package is not installed"):
            train(tiny_gpt2(), rows(), out_dir=str(tmp_path), **dict(FAST, tensorboard=True))
        train(tiny_gpt2(), rows(), out_dir=str(tmp_path / "auto"), **dict(FAST, tensorboard="auto"))
        assert not (tmp_path / "auto" / "tensorboard").exists()  # "auto" without the package: off
    with pytest.raises(LemonError, match="^tensorboard must be"):
        TrainConfig(tensorboard=3).check()


class PlainLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.lin(x).squeeze(-1), y)


def test_bad_hooks_and_export_targets_name_the_argument(tmp_path):
    data = [(torch.zeros(4), torch.tensor(0.0))] * 8
    with pytest.raises(LemonError, match="^callbacks must be callables"):
        train(PlainLoss(), data, callbacks=["print"], **FAST)
    with pytest.raises(LemonError, match="^export_dir needs a transformers model"):
        train(PlainLoss(), data, export_dir=str(tmp_path), **FAST)


def test_fsdp_setup_error_leaves_no_process_group():
    # a model with no _no_split_modules cannot be sharded by block: refused after the 1-process
    # group was created, which must be torn down again
    data = [(torch.zeros(4), torch.tensor(0.0))] * 8
    with pytest.raises(LemonError, match="_no_split_modules"):
        train(PlainLoss(), data, parallel="fsdp", **FAST)
    assert not dist.is_initialized()


def test_optimizer_of_other_parameters_is_refused():
    # with FSDP2 an optimizer built before train() holds the pre-sharding parameters
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(LemonError, match="^optimizer: its parameters are not the model's"):
        train(model, rows(), optimizer=opt, parallel="fsdp", **FAST)
    assert not dist.is_initialized()
    with pytest.raises(LemonError, match="^optimizer: its parameters are not the model's"):
        train(tiny_gpt2(), rows(), optimizer=opt, **FAST)


def test_export_in_one_process(tmp_path):
    model = tiny_gpt2()
    train(model, rows(), export_dir=str(tmp_path / "hf"), **FAST)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
