"""The out-of-domain similarity tasks (`ood` asset, conf/eval/ood.yaml): the files parse into the
pairs their authors published, and an STS task at its own length scores what scipy computes on
embeddings made independently at that length."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from train import assets
from train.embed import embedder
from train.errors import UserError
from train.evaluate import StsTask, build_tasks
from train.model import load_encoder


def test_lee_matrix_and_word_lists_parse_by_hand():
    # three documents, the matrix's upper triangle holds each pair once (zeros below, 1 on the diagonal)
    corpus = "First doc costs \xa3400.\nSecond doc.\nThird doc."
    matrix = "1\t0.3\t0.24\n0\t1\t0.9\n0\t0\t1\n"
    assert assets.lee_pairs(corpus, matrix) == [
        {"sentence1": "First doc costs \xa3400.", "sentence2": "Second doc.", "score": 0.3},
        {"sentence1": "First doc costs \xa3400.", "sentence2": "Third doc.", "score": 0.24},
        {"sentence1": "Second doc.", "sentence2": "Third doc.", "score": 0.9}]
    with pytest.raises(UserError, match="similarities0-1.txt: expected a 3 x 3 matrix"):
        assets.lee_pairs(corpus, "1\t0.3\n0\t1\n")
    words = ("# The SimLex-999 Test data (url)\n# Word 1\tWord 2\tHuman (mean)\n"
             "old\tnew\t1.58\nsmart\tintelligent\t9.2\n")
    assert assets.word_pairs(words) == [{"sentence1": "old", "sentence2": "new", "score": 1.58},
                                        {"sentence1": "smart", "sentence2": "intelligent", "score": 9.2}]


def test_ood_asset_holds_every_published_pair():
    """Counts from the sources: 50 documents -> 50 * 49 / 2 = 1,225 pairs; WordSim-353 and SimLex-999
    by their names. First rows as read by eye in the gensim wheel's files."""
    folder = assets.path("ood")
    rows = {name: [json.loads(line) for line in open(folder / f"{name}.jsonl", encoding="utf-8")]
            for name in ("lee_docs", "wordsim353", "simlex999")}
    assert {k: len(v) for k, v in rows.items()} == {"lee_docs": 1225, "wordsim353": 353, "simlex999": 999}
    lee = rows["lee_docs"]
    docs = {r["sentence1"] for r in lee} | {r["sentence2"] for r in lee}
    assert len(docs) == 50 and len({frozenset((r["sentence1"], r["sentence2"])) for r in lee}) == 1225
    assert lee[0]["sentence1"].startswith("The national executive of the strife-torn Democrats")
    assert lee[0]["score"] == 0.3 and lee[48]["score"] == 0.5  # similarities0-1.txt row 1, columns 2 and 50
    assert rows["wordsim353"][0] == {"sentence1": "love", "sentence2": "sex", "score": 6.77}
    assert rows["simlex999"][0] == {"sentence1": "old", "sentence2": "new", "score": 1.58}
    assert any("\xa3" in d for d in docs)  # lee.cor is Latin-1: its pound sign survives


def test_sts_task_at_its_own_length_matches_scipy_on_independent_embeddings(tmp_path):
    """The model cuts texts at 6 tokens (a training cut); the task reads them at 24. Reference: an
    encoder loaded with 24 tokens as its own length, its cosines ranked by scipy."""
    tiny = str(assets.path("tiny-bert"))
    texts = ["the cat sat on the mat and then slept all afternoon in the warm sun by the door",
             "a dog ran across the field chasing a red ball thrown by a child in a blue coat",
             "the cat slept on the mat all afternoon while the sun warmed the old wooden floor",
             "stock prices fell sharply on monday as investors worried about rising interest rates",
             "markets dropped at the start of the week on fears that rates would keep going up"]
    pairs = [(0, 2, 0.9), (0, 1, 0.2), (3, 4, 0.8), (1, 3, 0.0), (2, 4, 0.1), (1, 2, 0.3)]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps({"sentence1": texts[a], "sentence2": texts[b], "score": s}) + "\n"
                            for a, b, s in pairs))
    (task,) = build_tasks(OmegaConf.create({"t": {"kind": "sts", "path": str(path), "limit": None, "side": "query",
                                                  "max_length": 24}}))
    cut = load_encoder(tiny, max_length=6).eval()
    got = task(embedder(cut))["spearman"]

    reference = load_encoder(tiny, max_length=24).eval()
    assert max(len(ids) for ids in reference.tokenize(texts)) == 20  # longer than 6: the length matters
    with torch.no_grad():
        emb = F.normalize(torch.cat([reference(*t) for t in _single(reference, texts)]), dim=-1)
    cos = [float(emb[a] @ emb[b]) for a, b, _ in pairs]
    expected = spearmanr(cos, [s for _, _, s in pairs]).statistic
    assert got == pytest.approx(expected, abs=1e-9)
    at_cut = StsTask("t", str(path))(embedder(cut))["spearman"]
    assert at_cut != pytest.approx(expected, abs=1e-3)  # what the training cut alone would have reported

    # beyond the backbone's positions (tiny-bert: 128) the cut is the positions, not an index error
    assert len(cut.tokenize([" ".join(["word"] * 300)], max_length=100_000)[0]) == 128


def _single(encoder, texts):
    """One text a forward (no padding at all): ids [1, L], mask [1, L]."""
    for ids in encoder.tokenize(texts):
        yield torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)


def test_a_length_per_task_is_refused_where_it_would_be_ignored(tmp_path):
    with pytest.raises(UserError, match=r"eval.tasks.ir.max_length=64: a length per task is an sts task's"):
        build_tasks(OmegaConf.create({"ir": {"kind": "retrieval", "path": str(tmp_path), "limit": None,
                                             "max_length": 64}}))


@pytest.mark.parametrize("recipe", ["simcse_unsup", "simcse_sup", "e5_pretrain", "e5_finetune", "matryoshka",
                                    "lora_llm"])
def test_every_reproduction_table_recipe_reports_the_ood_tasks(compose, recipe):
    cfg = compose([f"recipe={recipe}", f"data={recipe}_offline"] if recipe != "matryoshka" else ["recipe=matryoshka"])
    assert {"snli_sts", "snli_ir", "lee_docs", "wordsim353", "simlex999"} <= set(cfg.eval.tasks)
    assert cfg.eval.tasks.lee_docs.max_length == 256


def test_paired_bootstrap_scores_as_the_evaluator_and_a_model_against_itself_differs_by_nothing(tmp_path):
    """tools/paired_bootstrap.py: its Spearman is the sts evaluator's on the same model and length, and
    with the texts resampled together for every model, a model against itself differs in no round (an
    unpaired resampling would not)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "paired_bootstrap.py"
    model, task = str(assets.path("tiny-bert")), str(assets.path("ood") / "lee_docs.jsonl")
    out = subprocess.run([sys.executable, str(tool), "--task", task, "--max-length", "64", "--rounds", "30",
                          model, model], capture_output=True, text=True, check=True).stdout
    encoder = load_encoder(model, max_length=64).eval()
    want = StsTask("lee", task, max_length=64)(embedder(encoder))["spearman"]
    got = [float(line.split("Spearman ")[1].split()[0]) for line in out.splitlines() if "Spearman" in line]
    # the tool takes its cosines from evaluate.StsTask, so they agree; 1e-3 is the printed rounding
    assert len(got) == 2 and all(abs(g - want) < 1e-3 for g in got) and "(1225 pairs of 50 texts)" in out
    assert "mean +0.0000, 95% interval +0.0000 .. +0.0000, below the base in 0.0% of 30 rounds" in out
