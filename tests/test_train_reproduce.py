"""examples/reproduce_lemon.py --quick (CI smoke): asserts only what is robust at toy scale."""
import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "reproduce_lemon.py")


@pytest.mark.slow
def test_quick_experiment(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce_lemon", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        res = mod.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert json.load(open(tmp_path / "reproduce_lemon.json"))["quick"] is True
    assert (tmp_path / "reproduce_lemon.png").stat().st_size > 0
    # the expanded model starts at the source's loss (lossless in float32) ...
    assert res["lossless_abs_diff"] < 1e-4
    assert res["expanded_start_val_loss"] == pytest.approx(res["source"]["final_val_loss"], abs=1e-4)
    for run in res["lemon"].values():
        assert run["start_val_loss"] == pytest.approx(res["source_val_loss"], abs=1e-4)
        # ... and training lowers it
        assert run["final_val_loss"] < run["start_val_loss"]
    assert res["scratch"]["final_val_loss"] < res["scratch"]["curve"][0][1]
    assert res["target"]["width"] == 2 * res["source"]["width"] and res["target"]["layers"] == 2 * res["source"]["layers"]
