"""tools/bench_gpu.py --quick: the GPU benchmark's every configuration runs on CPU (tiny models)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_quick_runs_padded_and_packed_and_counts_flops_by_hand(tmp_path):
    import bench_gpu
    from transformers import AutoConfig

    from train import assets

    runs = bench_gpu.main(["--quick", "--peak-tflops", "1", "--out", str(tmp_path / "gpu.json")])
    assert (tmp_path / "gpu.json").exists()
    assert [(r["model"], r["packed"]) for r in runs] == [
        ("tiny-bert", False), ("tiny-bert", True), ("tiny-llama-lora", False), ("tiny-llama-lora", True)]
    assert all("error" not in r for r in runs)
    for padded, packed in (runs[0:2], runs[2:4]):
        assert packed["padded_over_real"] < padded["padded_over_real"]  # packing computes less padding
    # N by hand for the tiny BERT: all parameters but the word, position and token-type tables
    cfg = AutoConfig.from_pretrained(assets.path("tiny-bert"))
    total = sum(p.numel() for p in bench_gpu.encoder_for("tiny-bert", 32, "sdpa", tmp_path).backbone.parameters())
    n = total - (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * cfg.hidden_size
    bert = runs[1]
    assert bert["non_embedding_params"] == n
    assert bert["mfu_8n"] == pytest.approx(8 * n * bert["real_tokens_per_s"] / 1e12)
    assert bert["mfu_6n"] == pytest.approx(6 * n * bert["real_tokens_per_s"] / 1e12)
