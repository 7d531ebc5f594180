"""Synthetic queries with consistency filtering (train/synthesis.py, train/jobs/synthesize.py): the
filter against a brute-force ranking, seeded generation independent of the batch, the job resumed
after a crash equal to an uninterrupted run, bad input, and 1 vs 2 ranks from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from train import assets, synthesis
from train.errors import UserError
from train.mining import search
from train.run import run

TINY = ["model=tiny_bert", f"synth.generator={assets.path('tiny-llama')}", "synth.temperature=1.0",
        "synth.max_new_tokens=6", "synth.text_field=text", "synth.shard_size=3", "synth.batch_size=3", "synth.limit=8"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """24 Wikipedia paragraphs of the `wiki` asset, with ids."""
    with open(assets.path("wiki") / "title_passage.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(24), f)]
    return write_jsonl(tmp_path_factory.mktemp("synth") / "corpus.jsonl",
                       [{"id": f"p{i}", "text": r["positive"]} for i, r in enumerate(rows)])


# --- the filter on made-up embeddings ------------------------------------------------------------


def brute_force_rank(scores: torch.Tensor, j: int, src: int) -> int:
    """Passages scoring above the source, plus those tied with it at a lower index."""
    s = scores[j]
    return int((s > s[src]).sum() + ((s == s[src]) & (torch.arange(len(s)) < src)).sum())


def test_consistency_filter_equals_a_brute_force_ranking():
    g = torch.Generator().manual_seed(0)
    p = F.normalize(torch.randn(60, 16, generator=g), dim=-1)  # [N, D]
    source = torch.randint(0, 60, (40,), generator=g)  # [Q]
    # Queries near their passage, at noise levels from "clearly its own" to "lost in the corpus".
    noise = torch.linspace(0.05, 3.0, 40).unsqueeze(1)
    q = F.normalize(p[source] + noise * torch.randn(40, 16, generator=g), dim=-1)
    scores = q @ p.T  # [Q, N], the whole matrix: the reference
    k, n = 3, 2
    _, cand = search(q, p, k + n + 1 + 4)
    f = synthesis.consistency(cand, source, k, relabel=True, num_negatives=n)
    ranks = [brute_force_rank(scores, j, int(source[j])) for j in range(40)]
    assert f.rank.tolist() == [r if r < cand.shape[1] else -1 for r in ranks]
    assert f.keep.tolist() == [r < k for r in ranks]
    assert 0 < int(f.keep.sum()) < 40  # both outcomes occur
    for other in (1, 2, 4, 5, 8):  # every threshold, so a pair exactly at rank k is met too
        assert synthesis.consistency(cand, source, other, False, 0).keep.tolist() == [r < other for r in ranks]
    assert any(r in (1, 2, 4, 5, 8) for r in ranks)
    assert f.positive.tolist() == scores.argmax(1).tolist()  # relabelled to the best-ranked passage
    for j in range(40):
        order = [int(i) for i in scores[j].argsort(descending=True, stable=True)]
        expected = [i for i in order[k:] if i not in (int(source[j]), int(f.positive[j]))][:n]
        assert f.negatives[j].tolist() == expected


def test_a_planted_outranked_passage_is_dropped_and_relabelling_picks_the_top():
    # query 0 was written for passage 0, but passage 2 answers it better; query 1's passage ranks first
    p = torch.eye(3)
    q = F.normalize(torch.tensor([[0.6, 0.0, 0.8], [0.1, 0.9, 0.0]]), dim=-1)
    _, cand = search(q, p, 3)
    source = torch.tensor([0, 1])
    assert synthesis.consistency(cand, source, 1, False, 0).keep.tolist() == [False, True]
    two = synthesis.consistency(cand, source, 2, True, 0)
    assert two.keep.tolist() == [True, True] and two.rank.tolist() == [1, 0]
    assert two.positive.tolist() == [2, 1]
    assert synthesis.consistency(cand, source, 2, False, 0).positive.tolist() == [0, 1]
    # negatives come from ranks >= k only: passage 2 outranks query 0's source but is no negative
    assert synthesis.consistency(cand, source, 1, False, 1).negatives.tolist() == [[1], [0]]


@pytest.mark.parametrize("reply, query", [
    ('"When did the battle of Cowpens take place?"\nThis passage...', "When did the battle of Cowpens take place?"),
    ("\n\nQuery: alchemy in visual art", "alchemy in visual art"),
    ("**Search query:** accreditation of academic programs", "accreditation of academic programs"),
    ("1. william preston civil war", "william preston civil war"),
    ("   \n  ", ""),
    # seen with SmolLM2-135M-Instruct on the wiki passages
    ('A user could search for "Andorra" in the search engine to find the passage.', "Andorra"),
    ('A user could type: "Lethbridge, Calgary, Edmonton, Red Deer', "Lethbridge, Calgary, Edmonton, Red Deer"),
    ("The passage is:", ""),
    ("A user could type:", ""),
    ("A: 1781 Battle of Cowpens", "1781 Battle of Cowpens"),
    ("The linguistic turn debate in art history.", "The linguistic turn debate in art history."),
])
def test_parse_query(reply, query):
    assert synthesis.parse_query(reply) == query


@pytest.mark.parametrize("reply, task", [
    ("Given a question about a battle, retrieve paragraphs that answer it.\nThe passage...",
     "Given a question about a battle, retrieve paragraphs that answer it."),
    ("\n**Task:** Given a city, retrieve its history", "Given a city, retrieve its history"),
    ("Retrieval task: find 'Cowpens' accounts", "find 'Cowpens' accounts"),  # inner quotes stay
    ('"Given a term, retrieve its definition"', "Given a term, retrieve its definition"),
    ("- Instruction: Given a disease, retrieve treatments", "Given a disease, retrieve treatments"),
    ("Task:", ""),
    ("  \n ", ""),
])
def test_parse_task(reply, task):
    assert synthesis.parse_task(reply) == task


# --- generation -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm():
    return synthesis.load_generator(str(assets.path("tiny-llama")), torch.device("cpu"))


def plain(tok):
    """The tokenizer without its chat template: prompts are the template filled in, nothing around."""
    return type("Plain", (), {"__call__": tok.__call__, "decode": tok.decode, "chat_template": None})()


def test_the_task_and_the_passage_are_filled_in_one_pass(tiny_llm):
    tok = plain(tiny_llm[1])
    text = synthesis.render(tok, "T={task} P={passage}", "a {task} b", 64, task="c {passage} d")
    assert text == "T=c {passage} d P=a {task} b"


def test_sampling_is_seeded_per_passage_and_independent_of_the_batch(tiny_llm):
    model, tok = tiny_llm
    passages = ["Short one.", "A somewhat longer passage about the history of alchemy in Europe.",
                "Mid length text on rivers.", "x " * 40, "Cornwallis advanced into North Carolina."]
    prompts = [synthesis.render(tok, "Query for: {passage}", t, 64) for t in passages]
    seeds = [synthesis.passage_seed(7, f"p{i}") for i in range(5)]
    alone = [synthesis.generate(model, tok, [pr], [s], 8, 1.0)[0] for pr, s in zip(prompts, seeds)]
    batched = synthesis.generate(model, tok, prompts, seeds, 8, 1.0)  # padded to the longest prompt
    reordered = synthesis.generate(model, tok, prompts[::-1], seeds[::-1], 8, 1.0)[::-1]
    assert batched == alone == reordered
    other = [synthesis.passage_seed(8, f"p{i}") for i in range(5)]
    assert synthesis.generate(model, tok, prompts, other, 8, 1.0) != batched  # the seed matters
    assert len(set(batched)) == 5  # a sample, not the same reply for every row


def test_greedy_batched_equals_one_at_a_time(tiny_llm):
    model, tok = tiny_llm
    prompts = [synthesis.render(tok, "{passage}", t, 64) for t in ("a b c", "the river Nile is long and wide", "x")]
    alone = [synthesis.generate(model, tok, [pr], [0], 6, 0.0)[0] for pr in prompts]
    assert synthesis.generate(model, tok, prompts, [0, 0, 0], 6, 0.0) == alone


def test_prompt_goes_through_the_chat_template_and_passages_are_cut(tiny_llm):
    _, tok = tiny_llm
    text = synthesis.render(tok, "Q: {passage}", "one two three four five six", 3)
    cut = tok.decode(tok("one two three four five six", add_special_tokens=False)["input_ids"][:3])
    assert text == tok.apply_chat_template([{"role": "user", "content": f"Q: {cut}"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "four" not in text and text.rstrip().endswith("assistant")


# --- the job ----------------------------------------------------------------------------------------


def synthesize(compose, run_dir: Path, *overrides: str) -> dict:
    return run(compose(["recipe=synthesize", *TINY, *overrides]), run_dir)


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*.jsonl"))}


def test_resumed_after_a_crash_equals_an_uninterrupted_run(compose, tmp_path, corpus, monkeypatch):
    whole = tmp_path / "whole"
    synthesize(compose, tmp_path / "r1", f"synth.corpus={corpus}", f"synth.out={whole}")
    expected = snapshot(whole)
    assert sorted(expected) == ["shards/shard-00000.jsonl", "shards/shard-00001.jsonl", "shards/shard-00002.jsonl",
                                "synthetic.jsonl", "synthetic_unfiltered.jsonl"]
    assert [r["index"] for r in read_jsonl(whole / "shards/shard-00002.jsonl")] == [6, 7]

    real, calls = synthesis.generate, []

    def crash_on_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **kw)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(synthesis, "generate", crash_on_second_shard)
    with pytest.raises(UserError, match="generating queries: rank 0: RuntimeError: killed"):
        synthesize(compose, tmp_path / "r2", f"synth.corpus={corpus}", f"synth.out={resumed}")
    assert sorted(p.name for p in (resumed / "shards").iterdir()) == ["shard-00000.jsonl"]  # no half shard

    calls.clear()
    monkeypatch.setattr(synthesis, "generate", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    synthesize(compose, tmp_path / "r3", f"synth.corpus={corpus}", f"synth.out={resumed}", "synth.batch_size=2")
    assert len(calls) == 3  # shard 1 (3 passages: 2 batches of 2) and 2 (2 passages: 1); shard 0 not redone
    assert snapshot(resumed) == expected  # nothing duplicated or skipped; the batch size changes nothing

    calls.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in (resumed / "shards").iterdir()}
    synthesize(compose, tmp_path / "r4", f"synth.corpus={corpus}", f"synth.out={resumed}")
    assert not calls and snapshot(resumed) == expected
    assert {p: p.stat().st_mtime_ns for p in (resumed / "shards").iterdir()} == mtimes

    with pytest.raises(UserError, match=r"its shards were generated with seed=42, this run has 3; use a new"):
        synthesize(compose, tmp_path / "r5", f"synth.corpus={corpus}", f"synth.out={resumed}", "seed=3")


def test_the_job_keeps_what_a_brute_force_ranking_keeps_and_the_output_trains(compose, tmp_path, corpus):
    from train.build import encoder
    from train.embed import encode

    out = tmp_path / "out"
    result = synthesize(compose, tmp_path / "run", f"synth.corpus={corpus}", f"synth.out={out}", "synth.top_k=5",
                        "synth.relabel=true", "synth.num_negatives=2")
    everything = read_jsonl(out / "synthetic_unfiltered.jsonl")
    kept = read_jsonl(out / "synthetic.jsonl")
    texts = [r["text"] for r in read_jsonl(Path(corpus))]
    enc = encoder(compose(["recipe=synthesize", *TINY]).model)
    q = F.normalize(encode(enc, [r["query"] for r in everything], "query"), dim=-1)
    p = F.normalize(encode(enc, texts, "passage"), dim=-1)
    scores = q @ p.T  # [Q, 24]
    src = [texts.index(r["positive"]) for r in everything]
    ranks = [brute_force_rank(scores, j, s) for j, s in enumerate(src)]
    assert [r["source_rank"] for r in everything] == [r if r < 11 else -1 for r in ranks]
    want = [j for j, r in enumerate(ranks) if r < 5]
    assert [r["query"] for r in kept] == [everything[j]["query"] for j in want]
    assert [r["positive"] for r in kept] == [texts[int(scores[j].argmax())] for j in want]
    assert all(len(r["negatives"]) == 2 and r["positive"] not in r["negatives"] for r in kept)
    assert result["summary"]["counts"]["kept"] == len(kept) and len(everything) == 8

    cfg = compose(["model=tiny_bert", f"data.path={out / 'synthetic.jsonl'}", "eval=none", "trainer.max_steps=1",
                   f"trainer.batch_size={min(4, len(kept))}", "trainer.log_every=1"])
    run(cfg, tmp_path / "train")
    assert [json.loads(s)["step"] for s in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()
            if "loss" in s] == [1]


def test_task_stage_and_several_queries_per_passage(compose, tmp_path, corpus, tiny_llm, monkeypatch):
    """synth=task_query with 3 queries per passage: every task and query equals its reference written one
    prompt at a time from its own seed (the first draw's seed is the passage's, as with one query); a
    run crashed in its second shard and resumed with another batch size writes the same files."""
    model, tok = tiny_llm
    cfg = compose(["recipe=synthesize", *TINY, "synth=task_query"]).synth
    n, texts = 3, [r["text"] for r in read_jsonl(Path(corpus))]
    args = [f"synth.corpus={corpus}", "synth=task_query", "synth.top_k=5", "synth.max_task_tokens=6"]
    real, prompts = synthesis.generate, {}  # seed -> the prompt the job generated from

    def record(model, tok, batch, seeds, *rest):
        prompts.update(zip(seeds, batch))
        return real(model, tok, batch, seeds, *rest)

    whole = tmp_path / "whole"
    monkeypatch.setattr(synthesis, "generate", record)
    synthesize(compose, tmp_path / "r1", *args, f"synth.out={whole}", f"synth.queries_per_passage={n}")
    monkeypatch.setattr(synthesis, "generate", real)
    rows = [r for i in range(3) for r in read_jsonl(whole / f"shards/shard-{i:05d}.jsonl")]
    assert [(r["index"], r["draw"]) for r in rows] == [(j, d) for j in range(8) for d in range(n)]
    # the query for a passage is written from its task (a random tiny LLM's reply barely depends on it)
    assert prompts == {**{synthesis.task_seed(42, f"p{j}"): synthesis.render(tok, cfg.task_prompt, texts[j], 256)
                          for j in range(8)},
                       **{synthesis.draw_seed(42, f"p{r['index']}", r["draw"]):
                          synthesis.render(tok, cfg.prompt, texts[r["index"]], 256, r["task"]) for r in rows}}

    def one(template: str, j: int, seed: int, tokens: int, task: str | None = None) -> str:
        return synthesis.generate(model, tok, [synthesis.render(tok, template, texts[j], 256, task)], [seed], tokens,
                                  1.0)[0]

    assert synthesis.draw_seed(42, "p0", 0) == synthesis.passage_seed(42, "p0")
    task_replies = [one(cfg.task_prompt, j, synthesis.task_seed(42, f"p{j}"), 6) for j in range(8)]
    for r in rows:
        j = r["index"]
        assert r["task_reply"] == task_replies[j]
        assert r["task"] == synthesis.parse_task(r["task_reply"])
        want = one(cfg.prompt, j, synthesis.draw_seed(42, f"p{j}", r["draw"]), 6, r["task"]) if r["task"] else ""
        assert r["reply"] == want
    assert all(r["task"] for r in rows) and all(len({r["reply"] for r in rows[j * n:(j + 1) * n]}) == n
                                                 for j in range(8))  # real tasks; draws that differ

    # every (passage, distinct query) is filtered on its own and carries the task it was written for
    out = read_jsonl(whole / "synthetic_unfiltered.jsonl")
    assert [(r["source_id"], r["query"], r["task"]) for r in out] == list(dict.fromkeys(
        (r["id"], synthesis.parse_query(r["reply"]), r["task"]) for r in rows if synthesis.parse_query(r["reply"])))
    kept = read_jsonl(whole / "synthetic.jsonl")
    assert [r["query"] for r in kept] == [r["query"] for r in out if r["source_rank"] in range(5)]
    assert all(r["task"] == rows[int(r["source_id"][1:]) * n]["task"] for r in kept)

    # crash in the second shard, resume with another batch size: the same files
    calls = []

    def crash_on_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 5:  # shard 0: 1 task batch + 3 query batches of 3; then shard 1
            raise RuntimeError("killed")
        return real(*a, **kw)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(synthesis, "generate", crash_on_second_shard)
    with pytest.raises(UserError, match="rank 0: RuntimeError: killed"):
        synthesize(compose, tmp_path / "r3", *args, f"synth.out={resumed}", f"synth.queries_per_passage={n}")
    assert sorted(p.name for p in (resumed / "shards").iterdir()) == ["shard-00000.jsonl"]
    monkeypatch.setattr(synthesis, "generate", real)
    synthesize(compose, tmp_path / "r4", *args, f"synth.out={resumed}", f"synth.queries_per_passage={n}",
               "synth.batch_size=2")
    assert snapshot(resumed) == snapshot(whole)
    with pytest.raises(UserError, match=r"generated with queries_per_passage=3, this run has 1"):
        synthesize(compose, tmp_path / "r2", *args, f"synth.out={resumed}")


def test_a_passage_without_a_task_gets_no_query_and_repeated_queries_count_once(tiny_llm, monkeypatch):
    from types import SimpleNamespace

    from train.jobs.synthesize import shard_rows

    tok = plain(tiny_llm[1])
    texts = ["alpha river", "beta mountain", "gamma lake"]
    settings = SimpleNamespace(task_prompt="T {passage}", prompt="Q {task} | {passage}", queries_per_passage=2,
                               batch_size=4, max_passage_tokens=64, max_task_tokens=8, max_new_tokens=8,
                               temperature=1.0)
    job = SimpleNamespace(settings=settings, corpus=SimpleNamespace(texts=texts, ids=None), seed=0)
    asked = []

    def fake(model, tok_, prompts, seeds, max_new_tokens, temperature):
        asked.extend(prompts)
        if prompts[0].startswith("T "):  # the task stage
            return ["Task:" if "beta" in p else f"Task: find {p.split()[1]}" for p in prompts]
        return ["Query: same" if "gamma" in p else f"q{len(asked) + i}" for i, p in enumerate(prompts)]

    monkeypatch.setattr(synthesis, "generate", fake)
    rows = shard_rows(job, None, tok, range(3))
    assert [(r["index"], r["draw"], r["task"]) for r in rows] == [
        (0, 0, "find alpha"), (0, 1, "find alpha"), (1, 0, ""), (1, 1, ""), (2, 0, "find gamma"), (2, 1, "find gamma")]
    assert not any("beta" in p for p in asked[3:])  # no query asked for the passage without a task
    assert [r["reply"] for r in rows[2:4]] == ["", ""]
    parsed = [{**r, "query": synthesis.parse_query(r["reply"])} for r in rows]
    assert [(r["index"], r["draw"]) for r in synthesis.distinct_queries(parsed)] == [(0, 0), (0, 1), (2, 0)]
    assert synthesis.distinct_queries([{"index": 0, "query": "A  b"}, {"index": 1, "query": "a b"},
                                       {"index": 0, "query": "a B"}]) == [{"index": 0, "query": "A  b"},
                                                                         {"index": 1, "query": "a b"}]


@pytest.mark.parametrize("make, message", [
    (lambda t, c: [f"synth.generator={assets.path('minilm')}"], "is not a causal LM (config.json architectures "
                                                                "['BertModel'], model_type 'bert')"),
    (lambda t, c: [f"synth.corpus={write_jsonl(t / 'empty.jsonl', [])}"], "empty.jsonl: no passage with text"),
    (lambda t, c: ["synth.prompt=Write a query."], "synth.prompt='Write a query.': has no {passage} placeholder"),
    (lambda t, c: ["synth.task_prompt=Name a search task.", "synth.prompt='For {task}: {passage}'"],
     "synth.task_prompt='Name a search task.': has no {passage} placeholder"),
    (lambda t, c: ["synth.task_prompt='Task for {passage}'"], "Passage: {passage}': has no {task} placeholder, but "
                                                             "synth.task_prompt is set"),
    (lambda t, c: ["synth.prompt='For {task}: {passage}'"], "holds {task}, but synth.task_prompt is not set"),
    (lambda t, c: ["synth.queries_per_passage=2", "synth.temperature=0"],
     "synth.queries_per_passage=2 with synth.temperature=0: greedy decoding writes the same query"),
    (lambda t, c: ["synth.queries_per_passage=0"], "synth.queries_per_passage=0: expected a positive integer"),
])
def test_bad_input_is_one_clear_message_and_nothing_is_written(compose, tmp_path, corpus, make, message):
    with pytest.raises(UserError, match=None) as e:
        synthesize(compose, tmp_path / "run", f"synth.corpus={corpus}", f"synth.out={tmp_path / 'out'}",
                   *make(tmp_path, corpus))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- the command line, on 1 and 2 ranks ---------------------------------------------------------------


def cli(*args: str, ranks: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(ranks)] if ranks else [sys.executable]
    return subprocess.run([*launcher, "-m", "train", "recipe=synthesize", *TINY, *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_two_ranks_write_the_same_pairs_as_one(tmp_path, corpus):
    # with both stages and 2 queries per passage (one query per passage is the same code, fewer rows)
    args = [f"synth.corpus={corpus}", "synth.top_k=5", "synth=task_query", "synth.queries_per_passage=2"]
    one = cli(*args, f"synth.out={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'r1'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*args, f"synth.out={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'r2'}", ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "synth_summary.json").read_text()) for d in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["counts"] == b["counts"]
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")

    bad = cli(*args, "synth.task_prompt=no placeholder", f"synth.out={tmp_path / 'bad'}",
              f"hydra.run.dir={tmp_path / 'r3'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: synth.task_prompt=")
    assert not (tmp_path / "bad").exists()
