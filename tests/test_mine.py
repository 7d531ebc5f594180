"""Hard-negative mining (train/mine.py, train/teacher.py): the selection rules on made-up
scores, the exact search against brute force, the job in process and from the command line
on 1 and 2 ranks, bad input, and the output training as it is."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import assets
from train.errors import UserError
from train.mining import Rule, make_plan, normalize_text, search, select
from train.retrieval import topk
from train.run import run

TINY = ["model=tiny_bert", "mine=topk"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def snli_pairs(start: int, count: int) -> list[dict]:
    with open(assets.path("snli") / "train_pairs.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(start + count), f)][start:]
    return [{"query": r["anchor"], "positive": r["positive"]} for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mine(compose, run_dir: Path, *overrides: str) -> dict:
    cfg = compose(["recipe=mine_hard_negatives", *overrides])
    return run(cfg, run_dir)


# --- selection on made-up scores ----------------------------------------------------------------


def one_query(scores: list[float], known: list[bool] | None = None):
    """cand_s, cand_i, never [1, k] for one query whose candidates are passages 0..k-1, best first."""
    s = torch.tensor([scores])
    known = torch.tensor([known or [False] * len(scores)])
    return s, torch.arange(len(scores)).unsqueeze(0), known


def test_window_skips_ranks_and_known_positives_take_none():
    s, i, known = one_query([0.99, 0.9, 0.8, 0.7, 0.6, 0.5], [True, False, False, True, False, False])
    chosen = select(s, i, known, torch.tensor([0]), torch.tensor([0.99]),
                    Rule(skip=1, window=3, num_negatives=2))
    # non-positives by rank: 1 (0.9), 2 (0.8), 4 (0.6), 5 (0.5); skip 1 -> ranks 1..3 = passages 2, 4, 5
    assert chosen.keep.tolist() == [True] and chosen.idx.tolist() == [[2, 4]]
    assert chosen.removed == {"known_positive": 2} and chosen.not_taken == 1
    assert chosen.top_is_positive == 1


@pytest.mark.parametrize("filters, picked, removed", [
    ({}, [0.88, 0.84], {}),                                         # plain top-k keeps the near-copy
    ({"max_score": 0.82}, [0.80, 0.70], {"max_score": 2}),          # TopK-Abs
    ({"margin_pos": 0.03}, [0.84, 0.80], {"margin_pos": 1}),        # TopK-MarginPos: above 0.87
    ({"perc_pos": 0.95}, [0.84, 0.80], {"perc_pos": 1}),            # TopK-PercPos: above 0.855
    ({"perc_pos": 0.9}, [0.80, 0.70], {"perc_pos": 2}),             # above 0.81
    ({"max_score": 0.86, "perc_pos": 0.9}, [0.80, 0.70], {"max_score": 1, "perc_pos": 1}),  # in turn
])
def test_positive_aware_filters(filters, picked, removed):
    s, i, known = one_query([0.88, 0.84, 0.80, 0.70, 0.60])
    chosen = select(s, i, known, torch.tensor([0]), torch.tensor([0.9]), Rule(window=5, num_negatives=2, **filters))
    assert chosen.scores[0].tolist() == pytest.approx(picked)
    assert chosen.removed == {"known_positive": 0, **removed}
    assert chosen.dropped.numel() == sum(removed.values())


def test_perc_pos_stays_below_a_negative_positive_score():
    s, i, known = one_query([-0.205, -0.3, -0.4])
    chosen = select(s, i, known, torch.tensor([0]), torch.tensor([-0.2]), Rule(window=3, num_negatives=1,
                                                                               perc_pos=0.95))
    assert chosen.scores.tolist() == [[pytest.approx(-0.3)]]  # -0.205 is within 5% of the positive: dropped


def test_too_few_survivors_skip_the_record_and_records_share_a_query():
    s, i, known = one_query([0.88, 0.84, 0.80, 0.70])
    # two records of one query, positives 0.9 and 0.5: the second keeps nothing above 0.475
    chosen = select(s, i, known, torch.tensor([0, 0]), torch.tensor([0.9, 0.5]),
                    Rule(window=4, num_negatives=2, perc_pos=0.95))
    assert chosen.keep.tolist() == [True, False]


def test_sampling_is_seeded_and_draws_from_the_survivors():
    g = torch.Generator().manual_seed(1)
    s = torch.rand((50, 30), generator=g).sort(dim=1, descending=True).values
    i, known = torch.arange(30).expand(50, 30), torch.zeros((50, 30), dtype=torch.bool)
    rec, pos = torch.arange(50), torch.ones(50)
    rule = Rule(skip=5, window=20, num_negatives=4, sample=True, max_score=0.9, seed=3)
    a = select(s, i, known, rec, pos, rule)
    b = select(s, i, known, rec, pos, rule)
    c = select(s, i, known, rec, pos, Rule(**{**rule.__dict__, "seed": 4}))
    assert torch.equal(a.idx, b.idx) and not torch.equal(a.idx, c.idx)
    ok = a.keep
    assert ok.sum() > 40
    assert ((a.idx[ok] >= 5) & (a.idx[ok] < 25)).all() and (a.scores[ok] <= 0.9).all()
    assert (a.idx[ok].diff(dim=1) > 0).all()  # distinct, in rank order
    assert len({tuple(r) for r in a.idx[ok].tolist()}) > 30  # not the same few everywhere


def test_plan_never_offers_positives_their_normalised_copies_or_the_query():
    corpus = ["A man laughing.", "a man  laughing", "A dog runs.", "The man laughs!", "A MAN LAUGHING",
              "Who is laughing?", "who is laughing"]
    plan = make_plan(["Who is laughing?", "Who is laughing?", "A cat."], ["A man laughing.", "A dog runs.",
                                                                        "A bird."], corpus)
    n = len(corpus)
    never = {(int(x) // n, int(x) % n) for x in plan.never}
    assert never == {(0, 0), (0, 1), (0, 4), (0, 2), (0, 5), (0, 6)}  # query 0: both positives, copies, itself
    assert plan.rec_query.tolist() == [0, 0, 1] and plan.rec_pos.tolist() == [0, 2, -1] and plan.max_never == 6
    assert normalize_text("  A  man, laughing! ") == "a man laughing"


# --- exact search ---------------------------------------------------------------------------------


def test_chunked_topk_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn((37, 16), generator=g), torch.randn((500, 16), generator=g)
    ref_s, ref_i = (q @ d.T).topk(12, dim=1)
    s, i = topk(q, d, 12, query_chunk=5, doc_chunk=64)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-6)
    s2, i2 = search(q, d, 12, query_chunk=5, doc_chunk=64)
    assert torch.equal(i2, ref_i)


def test_chunked_topk_with_ties_matches_brute_force():
    # Small integer vectors: exact sums and many exactly equal scores.
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (29, 6), generator=g).float()
    d = torch.randint(-2, 3, (400, 6), generator=g).float()
    full = q @ d.T  # [29, 400]
    k = 15
    ref_s = full.topk(k, dim=1).values
    kth = ref_s[:, -1:]
    for chunks in ((1, 7), (4, 64), (1024, 65536)):
        s, i = search(q, d, k, *chunks)
        assert torch.equal(s, ref_s)  # the same k best scores
        assert torch.equal(full.gather(1, i), s)  # each index really has its score
        assert all(len(set(row)) == k for row in i.tolist())  # no passage twice
        strict = s > kth  # every passage that beats the k-th score is in, ties at the k-th may differ
        assert torch.equal(strict.sum(1), (full > kth).sum(1))
        same = s[:, 1:] == s[:, :-1]
        assert (i[:, 1:] > i[:, :-1])[same].all()  # equal scores in passage order
        brute = sorted(range(400), key=lambda j: (-float(full[0, j]), j))[:k]
        assert [j for j, x in zip(i[0].tolist(), strict[0].tolist()) if x] == [j for j in brute if full[0, j] > kth[0]]


def test_faiss_search_equals_the_chunked_search(monkeypatch):
    import faiss  # noqa: F401  (the dev extra installs faiss-cpu: this test never skips)
    g = torch.Generator().manual_seed(0)
    q, d = torch.randn((20, 16), generator=g), torch.randn((300, 16), generator=g)
    s1, i1 = search(q, d, 10, 8, 64)
    s2, i2 = search(q, d, 10, 8, 64, use_faiss=True)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)


# --- the job ----------------------------------------------------------------------------------------


def near_copy(positive: str) -> str:
    """'A man is riding a bike.' -> 'A man is riding a bike there.': with MiniLM, 94% of SNLI
    positives' near-copies score above 95% of the positive's own score."""
    return positive.rstrip(". ") + " there."


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 SNLI (premise, entailment) pairs and a corpus of their positives, 200 other hypotheses,
    and per positive a near-copy (a false negative in all but name) and a copy that differs only in
    case and punctuation."""
    tmp = tmp_path_factory.mktemp("planted")
    pairs = snli_pairs(0, 40)
    others = [r["positive"] for r in snli_pairs(1000, 200)]
    near = [near_copy(r["positive"]) for r in pairs]
    copies = [r["positive"].lower().rstrip(".") for r in pairs]
    texts = [r["positive"] for r in pairs] + others + near + copies
    corpus = [{"_id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    return {"data": write_jsonl(tmp / "pairs.jsonl", pairs), "corpus": write_jsonl(tmp / "corpus.jsonl", corpus),
            "pairs": pairs, "near": set(near), "copies": set(copies)}


@pytest.mark.parametrize("preset, extra, max_near", [
    ("topk", [], None),
    ("nv_retriever", [], 0.1),
    ("margin_pos", [], 0.1),
    ("topk", ["mine.window=10", "mine.max_score=0.8"], None),
])
def test_planted_false_negatives(compose, tmp_path, planted, preset, extra, max_near):
    result = mine(compose, tmp_path, f"mine={preset}", f"data.path={planted['data']}",
                  f"mine.corpus={planted['corpus']}", *extra)
    records = read_jsonl(tmp_path / "mined.jsonl")
    summary = json.loads((tmp_path / "mine_summary.json").read_text())
    assert result["output"] == str(tmp_path / "mined.jsonl") and summary["counts"]["records"] == 40
    own = {}
    for r in planted["pairs"]:
        own.setdefault(r["query"], set()).add(normalize_text(r["positive"]))
    assert not [r for r in records if {normalize_text(n) for n in r["negatives"]} & own[r["query"]]], \
        "a query's positive (or a copy of it in other case and punctuation) became its negative"
    assert all(len(r["negatives"]) == 4 == len(r["negative_ids"]) for r in records)
    with_near = sum(near_copy(r["positive"]) in r["negatives"] for r in records) / len(records)
    if preset == "topk" and not extra:
        assert len(records) == 40 and with_near >= 0.9  # plain top-k keeps them
        assert summary["removed"]["known_positive"] >= 40  # each positive and its copy skipped
    elif max_near is not None:
        assert with_near <= max_near
        name = "perc_pos" if preset == "nv_retriever" else preset
        assert summary["removed"][name] >= 0.9 * 40
    else:
        assert summary["scores"]["kept"]["max"] <= 0.8 and summary["removed"]["max_score"] > 0
    assert summary["scores"]["dropped"]["count"] == sum(v for k, v in summary["removed"].items()
                                                          if k != "known_positive")


def tiny_cross_encoder(folder: Path) -> Path:
    """A randomly initialised 2-layer BertForSequenceClassification (one label), MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(assets.path("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_teacher_cross_encoder_and_bi_encoder(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from train import teacher
    from train.embed import encode
    from train.model import load_encoder

    queries, cands = ["A man plays guitar.", "Two dogs run."], [["A man makes music.", "A cat sleeps."],
                                                                ["Dogs are running.", "A man plays.", "Rain."]]
    ce = tiny_cross_encoder(tmp_path / "ce")
    got = teacher.score(str(ce), queries, cands, batch_size=2)
    model, tok = AutoModelForSequenceClassification.from_pretrained(ce).eval(), AutoTokenizer.from_pretrained(ce)
    with torch.no_grad():
        want = model(**tok(["Two dogs run."], ["A man plays."], return_tensors="pt")).logits[0, 0]
    assert [len(s) for s in got] == [2, 3] and got[1][1] == pytest.approx(float(want), abs=1e-5)

    bi = str(assets.path("tiny-bert"))
    got = teacher.score(bi, queries, cands)
    enc = load_encoder(bi).eval()
    q, p = encode(enc, ["Two dogs run."], "query"), encode(enc, ["Rain."], "passage")
    assert got[1][2] == pytest.approx(float(torch.nn.functional.cosine_similarity(q, p)[0]), abs=1e-5)


@pytest.fixture(scope="module")
def mined_with_teacher(compose, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    ce = tiny_cross_encoder(tmp / "ce")
    run_dir = tmp / "run"
    run_dir.mkdir()
    mine(compose, run_dir, *TINY, "data.limit=48", f"mine.teacher={ce}")
    return run_dir


def test_teacher_scores_are_written_and_the_output_trains_as_is(compose, tmp_path, mined_with_teacher):
    records = read_jsonl(mined_with_teacher / "mined.jsonl")
    assert len(records) == 48 and set(records[0]) == {"query", "positive", "negatives", "scores"}
    assert all(len(r["scores"]) == 1 + len(r["negatives"]) == 5 for r in records)
    summary = json.loads((mined_with_teacher / "mine_summary.json").read_text())
    assert summary["scores"]["teacher_positive"]["count"] == 48
    cfg = compose(["model=tiny_bert", f"data.path={mined_with_teacher / 'mined.jsonl'}", "eval=none",
                   "trainer.max_steps=2", "trainer.batch_size=8", "trainer.chunk_size=4", "trainer.log_every=1",
                   "loss.distill_weight=1.0"])
    run(cfg, tmp_path)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_parquet_and_datasets_output(compose, tmp_path, fmt):
    mine(compose, tmp_path, *TINY, "data.limit=24", f"mine.format={fmt}")
    if fmt == "parquet":
        from train.data import read_source

        src = read_source("mined", str(tmp_path / "mined.parquet"))
        assert len(src) == 24 and src.num_negatives == 4
    else:
        import datasets

        ds = datasets.load_from_disk(str(tmp_path / "mined"))
        assert len(ds) == 24 and len(ds[0]["negatives"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


# --- bad input --------------------------------------------------------------------------------------


def test_positives_missing_from_the_corpus_and_empty_passages_are_skipped_and_counted(compose, tmp_path, capsys):
    pairs = snli_pairs(0, 30)
    corpus = [{"text": r["positive"]} for r in pairs[2:]] + [{"text": t} for t in ("", "  ")] + \
        [{"text": r["positive"]} for r in snli_pairs(500, 40)]
    mine(compose, tmp_path, *TINY, f"data.path={write_jsonl(tmp_path / 'p.jsonl', pairs)}",
         f"mine.corpus={write_jsonl(tmp_path / 'c.jsonl', corpus)}")
    counts = json.loads((tmp_path / "mine_summary.json").read_text())["counts"]
    assert counts["skipped_positive_not_in_corpus"] == 2 and counts["corpus_empty"] == 2
    assert counts["written"] == 28
    err = capsys.readouterr().err
    assert "skipping 2 of 30 records: their positive is not in the corpus (records 1, 2)" in err
    assert "skipped 2 passages with empty text (lines 29, 30)" in err


def test_all_skipped_is_an_error_after_the_summary(compose, tmp_path):
    with pytest.raises(UserError, match=r"no record kept: all 16 records .* fewer than 4 negatives left in ranks "
                                        r"0-9 \(removed: known_positive \d+, perc_pos \d+\)"):
        mine(compose, tmp_path, "model=tiny_bert", "data.limit=16", "mine.perc_pos=0.01")
    assert not (tmp_path / "mined.jsonl").exists()
    assert json.loads((tmp_path / "mine_summary.json").read_text())["counts"]["skipped_too_few"] == 16


@pytest.mark.parametrize("make, message", [
    (lambda t: [f"data.path={write_jsonl(t / 'p.jsonl', [{'query': 'a', 'positive': 'b'}, {'query': ' ', 'positive': 'c'}, {'query': 'd', 'positive': ''}])}"],  # noqa: E501
     "p.jsonl: 2 of 3 records have an empty or missing query or positive (lines 2, 3)"),
    (lambda t: [f"mine.corpus={write_jsonl(t / 'c.jsonl', [{'id': 1, 'text': 'x'}, {'id': 2, 'text': 'y'}, {'id': 1, 'text': 'z'}, {'id': 2, 'text': 'w'}])}"],  # noqa: E501
     "c.jsonl: 2 passages repeat an id used before (first: '1' at lines 1 and 3); ids must be unique"),
    (lambda t: [f"mine.corpus={write_jsonl(t / 'c.jsonl', [{'body2': 'x'}])}"], "no passage text; expected a field"),
    (lambda t: ["mine.window=100"], "mine.skip=0 + mine.window=100 = 100 ranks, but the corpus"),
    (lambda t: ["mine.num_negatives=5", "mine.window=3"], "mine.num_negatives=5 is more than the mine.window=3"),
    (lambda t: [f"mine.corpus={write_jsonl(t / 'c.jsonl', [{'text': f'other {i}'} for i in range(20)])}"],
     "no positive of"),
])
def test_bad_input_is_one_clear_message(compose, tmp_path, make, message):
    with pytest.raises(UserError, match=re.escape(message)):
        mine(compose, tmp_path, *TINY, "data.limit=20", *make(tmp_path))


def test_faiss_asked_for_but_missing(compose, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(UserError, match="mine.faiss=true, but faiss is not installed: pip install faiss-cpu"):
        mine(compose, tmp_path, *TINY, "data.limit=20", "mine.faiss=true")


# --- the command line, on 1 and 2 ranks --------------------------------------------------------------


def cli(*args: str, ranks: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(ranks)] if ranks else [sys.executable]
    return subprocess.run([*launcher, "-m", "train", "recipe=mine_hard_negatives", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line_on_one_and_two_ranks_writes_the_same(tmp_path, planted):
    args = [f"data.path={planted['data']}", f"mine.corpus={planted['corpus']}", "mine=sampled", "mine.skip=2",
            "mine.window=30"]
    one = cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "mined 40 of 40 records" in one.stdout and "perc_pos" in one.stdout
    two = cli(*args, f"hydra.run.dir={tmp_path / 'two'}", ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "mine_summary.json").read_text()) for d in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert (tmp_path / "one" / "mined.jsonl").read_text() == (tmp_path / "two" / "mined.jsonl").read_text()
    assert a["counts"] == b["counts"] and a["removed"] == b["removed"]

    bad = cli(f"data.path={planted['data']}", "mine.window=100000", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: mine.skip=0 + mine.window")
