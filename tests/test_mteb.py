"""eval=mteb offline: mteb's mock tasks through the CLI; custom mteb tasks built from the shipped
SNLI test data score as the built-in evaluators do (an independent check of both); bad task and
benchmark names, and a Hub task while offline, are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

mteb = pytest.importorskip("mteb")

from train import assets, mteb_eval  # noqa: E402
from train.embed import embedder  # noqa: E402
from train.errors import UserError  # noqa: E402
from train.evaluate import RetrievalTask, StsTask  # noqa: E402
from train.model import load_encoder  # noqa: E402

MOCKS = ["MockRetrievalTask", "MockSTSTask", "MockClassificationTask"]


def test_mock_tasks_through_the_cli_offline(tmp_path):
    run = tmp_path / "run"
    args = ["recipe=eval", "eval=mteb", f"eval.mteb.tasks=[{','.join(MOCKS)}]", "model=tiny_bert",
            f"hydra.run.dir={run}"]
    out = subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "mteb" / "summary.json").read_text())
    assert [r["task"] for r in summary["tasks"]] == MOCKS
    results = {p.stem: json.loads(p.read_text()) for p in (run / "mteb" / "results").rglob("Mock*.json")}
    assert set(results) == set(MOCKS)
    for row in summary["tasks"]:  # the summary's score is the main score mteb wrote for the task
        written = [s[row["main_score"]] for split in results[row["task"]]["scores"].values() for s in split]
        assert row["score"] == pytest.approx(sum(written) / len(written))
    assert summary["by_type"]["STS"] == summary["tasks"][1]["score"]
    assert summary["mean"] == pytest.approx(sum(r["score"] for r in summary["tasks"]) / 3)


def _meta(name: str, kind: str, main: str, split: str):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(name=name, type=kind, main_score=main, description="SNLI test, shipped (snli asset)",
                        reference=None, dataset={"path": "NA", "revision": "NA"}, category="t2t",
                        eval_splits=[split], eval_langs=["eng-Latn"], date=("2015-01-01", "2015-12-31"),
                        dialect=["Written"], domains=[], task_subtypes=[], license="cc-by-4.0",
                        annotations_creators="human-annotated", modalities=["text"], sample_creation="found",
                        bibtex_citation="")


def test_custom_mteb_tasks_from_snli_equal_the_built_in_evaluators():
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.sts import AbsTaskSTS

    snli = assets.path("snli")
    sts = StsTask("snli_sts", str(snli / "test_sts.jsonl"), limit=300)
    ir = RetrievalTask("snli_ir", str(snli / "test_ir"), limit=60, corpus_limit=600)

    class SnliSts(AbsTaskSTS):
        metadata = _meta("SnliSts", "STS", "cosine_spearman", "test")
        min_score, max_score = 0, 1

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": sts.s1, "sentence2": sts.s2, "score": [float(g) for g in sts.gold]})})
            self.data_loaded = True

    class SnliIr(AbsTaskRetrieval):
        metadata = _meta("SnliIr", "Retrieval", "ndcg_at_10", "test")

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": f"q{q}", "text": t} for q, t in zip(ir.query_ids, ir.query_texts)]),
                corpus=Dataset.from_list([{"id": f"d{d}", "text": t} for d, t in zip(ir.doc_ids, ir.doc_texts)]),
                relevant_docs={f"q{q}": {f"d{ir.doc_ids[i]}": int(g) for i, g in ir.rel[q].items()}
                               for q in ir.query_ids},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    encoder = load_encoder(str(assets.path("minilm")), max_length=64).eval()
    ours = {**sts(embedder(encoder)), **ir(embedder(encoder))}
    rows = mteb_eval.evaluate([SnliSts(), SnliIr()], embedder(encoder), "train/minilm", None)
    theirs = {r["task"]: r["score"] for r in rows}
    assert theirs["SnliSts"] == pytest.approx(ours["spearman"], abs=1e-4)
    assert theirs["SnliIr"] == pytest.approx(ours["ndcg@10"], abs=1e-4)
    assert 0.3 < ours["spearman"] < 0.9 and 0.3 < ours["ndcg@10"] < 0.95  # real figures, not a degenerate case


@pytest.mark.parametrize("tasks, benchmark, message", [
    (["STSBenchmarc"], None, "eval.mteb.tasks: 'STSBenchmarc' is not an mteb task; close names: STSBenchmark, "),
    (["MockRetrievalTsk"], None, "close names: MockRetrievalTask"),
    ([], "MTEB(eng, v9)", "eval.mteb.benchmark='MTEB(eng, v9)': not an mteb benchmark; close names: MTEB(eng, v2)"),
    ([], None, "set one of eval.mteb.tasks"),
])
def test_unknown_names_are_one_line_with_close_names(tasks, benchmark, message):
    with pytest.raises(UserError) as e:
        mteb_eval.resolve(tasks, benchmark)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_hub_task_while_offline_is_one_line_naming_task_and_setting(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = mteb_eval.resolve(["STSBenchmark"], None)
    with pytest.raises(UserError) as e:
        mteb_eval.evaluate(tasks, lambda texts, side: torch.ones(len(texts), 4), "x", None)
    assert str(e.value).startswith("eval.mteb: task STSBenchmark needs its data from the Hugging Face Hub, and "
                                   "HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 are set")


@pytest.mark.parametrize("name, count", [("simcse_sts", 7), ("beir", None), ("mteb_eng", 56)])
def test_paper_eval_configs_name_real_mteb_tasks_and_their_published_row(compose, name, count):
    cfg = compose(["recipe=eval", f"eval={name}"])
    tasks = mteb_eval.resolve(list(cfg.eval.mteb.tasks), cfg.eval.mteb.benchmark)  # no data is loaded
    assert count is None or len(tasks) == count
    assert cfg.eval.paper.source and "average" in cfg.eval.paper.scores
    if name == "simcse_sts":
        # Gao, Yao, Chen, SimCSE (arXiv 2104.08821), Table 5, "*SimCSE-BERT_base" in the supervised block,
        # written out from the paper (STS12-16, STS-B, SICK-R, Avg.); princeton-nlp/SimCSE's README lists
        # the same average (81.57) for sup-simcse-bert-base-uncased.
        paper = {"STS12": 75.30, "STS13": 84.67, "STS14": 80.19, "STS15": 85.40, "STS16": 80.82,
                 "STSBenchmark": 84.25, "SICK-R": 80.39, "average": 81.57}
        assert dict(cfg.eval.paper.scores) == paper
        # the unsupervised row of the same table (unsup-SimCSE-BERT_base; README average 76.25), named in the source
        assert "unsup: 68.40 82.41 74.38 80.91 78.56 76.85 72.23, average 76.25" in cfg.eval.paper.source
        assert sum(v for k, v in paper.items() if k != "average") / 7 == pytest.approx(paper["average"], abs=0.01)


def test_paper_vs_run_prints_both_rows(tmp_path):
    (tmp_path / "mteb").mkdir()
    paper = "eval:\n  paper:\n    source: a paper\n    scores: {STS12: 75.3, average: 80.0}\n"
    (tmp_path / "config.yaml").write_text(paper)
    (tmp_path / "mteb" / "summary.json").write_text(json.dumps(
        {"tasks": [{"task": "STS12", "type": "STS", "main_score": "cosine_spearman", "score": 0.7}],
         "by_type": {"STS": 0.7}, "mean": 0.7}))
    out = subprocess.run([sys.executable, "tools/paper_vs_run.py", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "paper: a paper"
    assert lines[2].split() == ["STS12", "75.30", "70.00", "-5.30"]
    assert lines[3].split() == ["average", "80.00", "70.00", "-10.00"]
    missing = subprocess.run([sys.executable, "tools/paper_vs_run.py", str(tmp_path / "nope")], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
