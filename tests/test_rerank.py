"""The cross-encoder (recipe=reranker): its losses against hand-computed values, its saved folder
against sentence-transformers' CrossEncoder and the mining teacher, its step against the
single-process full batch (chunked, accumulated, and on 2 gloo ranks), its evaluator against a
hand-ranked list, and the bad inputs it refuses."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import grads, grouped_source, max_rel_diff, plain_engine, rerank_reference, tiny_cross_encoder_folder

from train import assets
from train.cross_encoder import is_cross_encoder, load_cross_encoder
from train.data import collate_pairs
from train.losses import listwise_loss, pointwise_loss, rerank_loss
from train.model import pad
from train.rerank import rerank_step

DOUBLE = torch.float64  # the steps' gradient comparisons (see the chunked test)
PAIRS = [("A man plays a guitar.", "Someone makes music."), ("A dog runs.", "A cat sleeps on the sofa all day."),
         ("rain", "It is raining in the city and the streets are wet."), ("Two kids", "Children.")]


# --- losses ----------------------------------------------------------------------------------------


def test_listwise_loss_is_the_softmax_cross_entropy_of_the_positive():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 1.0]])
    by_hand = [-math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1)),
               math.log(3),
               -math.log(math.exp(-1) / (math.exp(-1) + math.exp(3) + math.exp(1)))]
    assert float(listwise_loss(scores)) == pytest.approx(sum(by_hand) / 3, abs=1e-6)
    assert float(rerank_loss(scores, "listwise")) == pytest.approx(sum(by_hand) / 3, abs=1e-6)


def test_pointwise_loss_labels_the_positive_1_and_each_negative_0():
    scores = torch.tensor([[2.0, 1.0, 0.0], [-1.0, 3.0, 1.0]])

    def sig(x):
        return 1 / (1 + math.exp(-x))

    by_hand = [-math.log(sig(2.0)), -math.log(1 - sig(1.0)), -math.log(1 - sig(0.0)),
               -math.log(sig(-1.0)), -math.log(1 - sig(3.0)), -math.log(1 - sig(1.0))]
    assert float(pointwise_loss(scores)) == pytest.approx(sum(by_hand) / 6, abs=1e-6)
    assert float(rerank_loss(scores, "pointwise")) == pytest.approx(sum(by_hand) / 6, abs=1e-6)


# --- the saved folder ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ce_folder(tmp_path_factory) -> str:
    return tiny_cross_encoder_folder(tmp_path_factory.mktemp("ce") / "model")


def our_scores(folder: str, pairs=PAIRS) -> torch.Tensor:
    ce = load_cross_encoder(folder).eval()
    with torch.no_grad():
        return ce(*pad(ce.tokenize(pairs), ce.pad_id))


def test_segments_recovered_from_the_separator_are_the_tokenizers(ce_folder):
    ce = load_cross_encoder(ce_folder)
    enc = ce.tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, return_tensors="pt")
    assert ce.segments and enc["token_type_ids"].sum() > 0
    assert torch.equal(ce.token_types(enc["input_ids"], enc["attention_mask"]), enc["token_type_ids"])


def test_saved_cross_encoder_scores_the_same_in_sentence_transformers(ce_folder):
    from sentence_transformers import CrossEncoder

    ours = our_scores(ce_folder)
    assert float(ours.std()) > 5e-3  # scores that differ (by 1e3 x the tolerance): a wrong segment or pair shows
    st = CrossEncoder(ce_folder, device="cpu")
    logits = torch.as_tensor(st.predict(PAIRS, activation_fn=torch.nn.Identity()))
    assert torch.allclose(logits.float(), ours, atol=1e-5), (logits, ours)
    # its default activation for one label (sigmoid), as saved in config_sentence_transformers.json
    assert torch.allclose(torch.as_tensor(st.predict(PAIRS)).float(), torch.sigmoid(ours), atol=1e-5)


def test_the_mining_teacher_reads_the_saved_folder_and_scores_the_same(ce_folder, tmp_path):
    from train.teacher import score

    assert is_cross_encoder(Path(ce_folder))
    ours = our_scores(ce_folder)
    got = score(ce_folder, [q for q, _ in PAIRS], [[p] for _, p in PAIRS], batch_size=3)
    assert torch.allclose(torch.tensor([s[0] for s in got]), ours, atol=1e-5)


def test_the_training_cut_does_not_leak_into_the_saved_length(tmp_path):
    """max_length (training) 16; the folder keeps the base model's inference length."""
    from sentence_transformers import CrossEncoder

    base = load_cross_encoder(str(assets.path("tiny-bert")))
    trained = load_cross_encoder(str(assets.path("tiny-bert")), max_length=16)
    assert trained.max_length == 16 and trained.save_max_length == base.save_max_length > 16
    trained.save(tmp_path / "m")
    assert CrossEncoder(str(tmp_path / "m"), device="cpu").max_seq_length == base.save_max_length
    assert trained.tokenizer.model_max_length == base.tokenizer.model_max_length  # restored after the save
    chosen = load_cross_encoder(str(assets.path("tiny-bert")), max_length=16, save_max_length=64)
    chosen.save(tmp_path / "c")
    assert CrossEncoder(str(tmp_path / "c"), device="cpu").max_seq_length == 64


def test_a_two_label_classifier_scores_the_log_odds(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tiny = str(assets.path("tiny-bert"))
    model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny)
    enc = tok([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**enc).logits
    assert torch.allclose(our_scores(str(tmp_path)), logits[:, 1] - logits[:, 0], atol=1e-5)


# --- the step ----------------------------------------------------------------------------------------


def test_chunked_and_accumulated_steps_give_the_full_batch_gradient(ce_folder):
    """rerank_step forwards chunks of 3 examples and backpropagates each alone; 2 accumulated
    batches: the gradient of the mean of their full-batch losses, by plain autograd. In float64
    (DOUBLE): the tiny random model's scores are close together, so its float32 gradients carry
    rounding noise of 1e-4 of their size from the order of summation alone."""
    ce = load_cross_encoder(ce_folder, dtype=DOUBLE).eval()
    source, loss_fn = grouped_source(16), functools.partial(rerank_loss, kind="listwise")
    batches = [collate_pairs([source], [(0, r) for r in range(s, s + 8)], ce.tokenize) for s in (0, 8)]
    assert batches[0].group == 4 and len(batches[0]) == 8
    ref_losses, ref = rerank_reference(ce, batches, loss_fn)
    ce.zero_grad(set_to_none=True)
    engine = plain_engine(ce)
    losses = [rerank_step(engine, b, loss_fn, chunk_size=3, scale=0.5, reduce=i == 1).loss
              for i, b in enumerate(batches)]
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert max_rel_diff(grads(ce), ref) < 1e-5


def test_two_gloo_ranks_equal_one_process(ce_folder, tmp_path):
    """DDP and FSDP2 on 2 ranks (chunks of 2, 2 accumulated batches) vs the single-process full batch
    (float64, as the chunked test)."""
    worker = Path(__file__).parent / "rerank_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path), ce_folder, "ddp", "fsdp2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ce = load_cross_encoder(ce_folder, dtype=DOUBLE).eval()
    source, loss_fn = grouped_source(16), functools.partial(rerank_loss, kind="listwise")
    batches = [collate_pairs([source], [(0, r) for r in range(s, s + 8)], ce.tokenize) for s in (0, 8)]
    ref_losses, ref = rerank_reference(ce, batches, loss_fn)
    for strategy in ("ddp", "fsdp2"):
        result = torch.load(tmp_path / f"{strategy}.pt")
        assert result["world_size"] == 2, strategy
        assert result["losses"] == pytest.approx(ref_losses, abs=1e-5), strategy
        assert max_rel_diff(result["grads"], ref) < 1e-5, strategy


# --- the evaluator ------------------------------------------------------------------------------------


def test_rerank_task_reorders_the_retrievers_candidates(tmp_path):
    """Two queries, a retriever that put the relevant document last among 3 candidates; a scorer
    that prefers it moves it first: nDCG@10 1/log2(4) -> 1 for that query, by hand."""
    from train.evaluate import RerankTask, RetrievalTask

    folder = tmp_path / "ir"
    folder.mkdir()
    docs = ["d0", "d1", "d2", "d3"]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"id": d, "text": f"text {d}"}) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"id": "a", "text": "qa"}) + "\n"
                                          + json.dumps({"id": "b", "text": "qb"}) + "\n")
    (folder / "qrels.jsonl").write_text(json.dumps({"query_id": "a", "doc_id": "d2"}) + "\n"
                                        + json.dumps({"query_id": "b", "doc_id": "d3"}) + "\n")
    base = RetrievalTask("t", str(folder))
    task = RerankTask("t", base, torch.tensor([[0, 1, 2], [3, 0, 1]]))  # a: relevant last; b: first

    def scorer(pairs):  # prefers "text d2", otherwise keeps the order it is given
        return torch.tensor([1.0 if p == "text d2" else -float(i) for i, (_, p) in enumerate(pairs)])

    got = task(scorer)
    assert got["retriever_ndcg@10"] == pytest.approx((1 / math.log2(4) + 1) / 2)
    assert got["ndcg@10"] == pytest.approx(1.0) and got["mrr@10"] == pytest.approx(1.0)
    assert got["retriever_mrr@10"] == pytest.approx((1 / 3 + 1) / 2) and got["recall@k"] == 1.0


# --- bad input: one line, exit 2, nothing written -------------------------------------------------


def three_label_folder(t: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny = str(assets.path("tiny-bert"))
    AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=3).save_pretrained(t / "three")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(t / "three")


SNLI = str(assets.path("snli"))
BAD = [
    (["data.path=" + SNLI + "/train_pairs.jsonl"], None,
     "recipe reranker (loss.rerank=listwise) needs each query's positive and negatives, but source 'main' "),
    (["data.path=" + SNLI + "/train_sentences.jsonl", "loss.rerank=pointwise"], None,
     "(loss.rerank=pointwise) needs each query's positive and negatives, but source 'main'"),
    (["model.path={t}/three"], three_label_folder, "a classifier with 3 labels; a re-ranker needs 1"),
    (["eval=snli"], None, "eval.tasks.snli_sts.kind=sts: a cross-encoder (model.kind=cross_encoder) scores pairs"),
    (["eval.tasks.snli_rerank.retriever=null"], None, "eval.tasks.snli_rerank.retriever is not set"),
    (["model.head=mlp"], None, "model.head=mlp is an embedder's setting; model.kind=cross_encoder has none"),
    (["loss.distill_weight=1.0"], None, "loss.distill_weight=1.0: distillation trains an embedder"),
    (["model.kind=embedder", "eval=snli"], None, "loss.rerank=listwise is a cross-encoder's loss"),
    (["model.kind=embedder", "loss.rerank=null"], None, "eval.tasks.snli_rerank.kind=rerank evaluates a cross-encoder"),
]


@pytest.mark.parametrize("overrides, make, message", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, overrides, make, message):
    from test_cli import main_in_process

    if make:
        make(tmp_path)
    tiny = str(assets.path("tiny-bert"))
    run = tmp_path / "run"
    cut = [] if "eval=snli" in overrides else [  # the rerank tasks, small, with the tiny model as retriever
        f"eval.tasks.snli_rerank.retriever={tiny}", f"eval.tasks.gcide_rerank.retriever={tiny}",
        "eval.tasks.snli_rerank.limit=5", "eval.tasks.gcide_rerank.limit=5"]
    args = ["recipe=reranker", "model=tiny_bert", f"data.path={SNLI}/train_triples.jsonl", "data.limit=32",
            "trainer.max_steps=1", "trainer.batch_size=8", *cut, *(o.format(t=tmp_path) for o in overrides),
            f"hydra.run.dir={run}"]
    code, err = main_in_process(args, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert message.format(t=tmp_path) in lines[-1], lines[-1]
    assert not (run / "model").exists() and not (run / "checkpoints").exists()
