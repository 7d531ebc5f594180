"""Evaluators against independent references: scipy's Spearman, hand-computed ranking metrics,
brute-force top-k."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from train.errors import UserError
from train.evaluate import PairsTask, RetrievalTask, StsTask, build_tasks, run_tasks, spearman
from train.retrieval import topk


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)
    b = a + rng.normal(0, 2, 200)
    assert abs(spearman(a, b) - spearmanr(a, b).statistic) < 1e-12


def test_chunked_topk_equals_brute_force():
    torch.manual_seed(0)
    q, d = torch.randn(37, 16), torch.randn(1000, 16)
    scores, idx = topk(q, d, k=7, query_chunk=5, doc_chunk=64)
    brute = (q @ d.T).topk(7, dim=1)
    assert torch.equal(idx, brute.indices)
    assert torch.allclose(scores, brute.values)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_embed(table):
    def embed(texts, side):
        return torch.tensor([table[t] for t in texts], dtype=torch.float32)
    return embed


def test_retrieval_metrics_by_hand(tmp_path):
    write(tmp_path / "corpus.jsonl", [{"id": "d1", "text": "x"}, {"id": "d2", "text": "y"},
                                      {"id": "d3", "text": "z"}])
    write(tmp_path / "queries.jsonl", [{"id": "q1", "text": "qa"}, {"id": "q2", "text": "qb"}])
    write(tmp_path / "qrels.jsonl", [{"query_id": "q1", "doc_id": "d2", "score": 1},
                                     {"query_id": "q2", "doc_id": "d1", "score": 1},
                                     {"query_id": "q2", "doc_id": "d3", "score": 1}])
    # q1 ranks d1, d2, d3 (relevant at rank 2); q2 ranks d1, d3, d2 (relevant at ranks 1, 2)
    table = {"x": [1, 0, 0], "y": [0.8, 0.6, 0], "z": [0.6, 0, 0.8], "qa": [1, 0.1, 0], "qb": [1, 0, 0.6]}
    m = RetrievalTask("t", str(tmp_path))(fake_embed(table))
    ndcg_q1 = (1 / math.log2(3)) / 1.0
    ndcg_q2 = 1.0
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    assert m["mrr@10"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["recall@10"] == pytest.approx(1.0)


def test_sts_task_and_bad_files(tmp_path):
    write(tmp_path / "sts.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1.0},
                                   {"sentence1": "a", "sentence2": "c", "score": 0.0},
                                   {"sentence1": "b", "sentence2": "c", "score": 0.5}])
    table = {"a": [1, 0], "b": [0.9, 0.1], "c": [0, 1]}
    assert StsTask("s", str(tmp_path / "sts.jsonl"))(fake_embed(table))["spearman"] == pytest.approx(1.0)
    write(tmp_path / "bad.jsonl", [{"sentence1": "a", "score": 1.0}])
    with pytest.raises(UserError, match='bad.jsonl:1: missing field "sentence2"'):
        StsTask("s", str(tmp_path / "bad.jsonl"))


def test_truncated_dims_are_evaluated_on_renormalised_prefixes(tmp_path):
    """Through the real retrieval task: the 2-d prefixes are not unit vectors, and ranking them by
    cosine (renormalised) and by dot product (not) disagree, as do the full vectors."""
    write(tmp_path / "corpus.jsonl", [{"id": "d1", "text": "x"}, {"id": "d2", "text": "y"}])
    write(tmp_path / "queries.jsonl", [{"id": "q1", "text": "qa"}])
    write(tmp_path / "qrels.jsonl", [{"query_id": "q1", "doc_id": "d1"}])
    # prefixes: qa [1, 0]; x [1, 0.1] (cosine 0.995, dot 1); y [2, 2] (cosine 0.707, dot 2)
    # full: x is far from qa (cosine 0.33), y close (0.71)
    table = {"qa": [1, 0, 0, 0], "x": [1, 0.1, 3, 0], "y": [2, 2, 0, 0]}
    out = run_tasks([RetrievalTask("ir", str(tmp_path))], fake_embed(table), dims=[2])
    assert out["ir/mrr@10"] == pytest.approx(0.5)  # full vectors: y first
    assert out["ir@2/mrr@10"] == pytest.approx(1.0)  # renormalised prefixes: x first (raw dots: y first)


def test_retrieval_corpus_limit_keeps_the_relevant_documents(tmp_path):
    rows = lambda items: "".join(json.dumps(r) + "\n" for r in items)  # noqa: E731
    (tmp_path / "corpus.jsonl").write_text(rows({"id": f"d{i}", "text": f"doc {i}"} for i in range(6)))
    (tmp_path / "queries.jsonl").write_text(rows([{"id": "q0", "text": "a"}, {"id": "q1", "text": "b"}]))
    (tmp_path / "qrels.jsonl").write_text(rows([{"query_id": "q0", "doc_id": "d4"},
                                                {"query_id": "q1", "doc_id": "d5"}]))
    task = RetrievalTask("ir", str(tmp_path), limit=1, corpus_limit=3)
    assert task.doc_ids == ["d0", "d1", "d4"]  # q0's relevant d4, then the first others
    assert {q: {task.doc_ids[d] for d in rel} for q, rel in task.rel.items()} == {"q0": {"d4"}}


def test_tasks_tuned_for_an_eval_config_that_is_not_chosen_are_left_out(compose):
    """lora_llm tunes snli_sts/snli_ir (instructions); with eval=none they are no tasks. Beside
    defined tasks, a tuned name that none defines is refused, naming it."""
    assert build_tasks(compose(["recipe=lora_llm", "data=lora_llm_offline", "eval=none"]).eval.tasks) == []
    from omegaconf import OmegaConf

    from train.config import EvalConfig

    # as a recipe's YAML would say it (the command line cannot add a task without its kind)
    tuned = OmegaConf.merge(OmegaConf.structured(EvalConfig), compose(["eval=snli"]).eval,
                            {"tasks": {"snli_st": {"limit": 5}}})
    with pytest.raises(UserError, match=r"eval.tasks.snli_st has settings but no kind: .*\(snli_sts, snli_ir\)"):
        build_tasks(tuned.tasks)


def test_pairs_task_is_the_retrieval_task_it_stands_for(tmp_path):
    """A pairs file as retrieval: "qa" listed twice has both its definitions relevant; "x" is shared
    by two queries and is one document; limit=3 keeps the first three distinct queries and only
    their positives. Scored by hand as the same BEIR-layout folder would be."""
    write(tmp_path / "pairs.jsonl", [{"query": "qa", "positive": "x"}, {"query": "qb", "positive": "y"},
                                     {"query": "qa", "positive": "z"}, {"query": "qc", "positive": "x"},
                                     {"query": "qd", "positive": "w"}])
    table = {"x": [1, 0, 0], "y": [0.8, 0.6, 0], "z": [0.6, 0, 0.8],  # documents of unit length
             "qa": [1, 0.1, 0], "qb": [1, 0, 0.6], "qc": [0.1, 1, 0]}
    task = PairsTask("p", str(tmp_path / "pairs.jsonl"), limit=3)
    assert sorted(task.doc_texts) == ["x", "y", "z"] and task.query_texts == ["qa", "qb", "qc"]
    m = task(fake_embed(table))
    # qa: x 1.0, y 0.86, z 0.6 -> relevant x, z at ranks 1, 3
    # qb: z 1.08, x 1.0, y 0.8 -> relevant y at rank 3
    # qc: y 0.68, x 0.1, z 0.06 -> relevant x at rank 2
    ndcg = [(1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), 1 / math.log2(4), 1 / math.log2(3)]
    assert m["ndcg@10"] == pytest.approx(sum(ndcg) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["recall@10"] == 1.0


def test_pairs_task_without_a_positive_field_is_refused(tmp_path):
    write(tmp_path / "p.jsonl", [{"query": "a", "text2": "b"}])
    with pytest.raises(UserError, match=r"p.jsonl:1: a pairs task needs a positive field named one of positive"):
        PairsTask("p", str(tmp_path / "p.jsonl"))
