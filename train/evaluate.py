"""Evaluators: an STS-style task and a retrieval task, run on any `embed(texts, side)`.

STS-style: pairs with a gold score; Spearman correlation of the cosine similarity.
Retrieval: queries, a corpus and relevance judgements (BEIR layout as JSONL):
nDCG@10, MRR@10, Recall@10 and Recall@100 from an exact, chunked top-k search.

`embed` is built by the caller (the loop shards it across ranks), so the tasks know
nothing of models or processes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from train.data import iter_jsonl
from train.errors import UserError, at
from train.retrieval import topk

Embed = Callable[[list[str], str | None], torch.Tensor]


def _read_jsonl(path: Path, required: tuple[str, ...], what: str) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: no such {what} file")
    rows = []
    for line_no, row in iter_jsonl(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise UserError(f'{at(path, line_no)}: missing field "{missing[0]}" (a {what} record needs '
                            f"{', '.join(required)})")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: the {what} file is empty")
    return rows


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(np.asarray(a, dtype=np.float64)), rankdata(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


class StsTask:
    """Pairs with a similarity score (`sentence1`, `sentence2`, `score`). `max_length`: the token cut
    for these texts, None: the model's (in training, the training cut: a task of long documents sets
    the model's inference length, or it measures a model that reads only their first sentences)."""

    metrics = ("spearman",)

    def __init__(self, name: str, path: str, limit: int | None = None, side: str | None = "query",
                 instruction: str | None = None, max_length: int | None = None):
        self.name, self.side, self.instruction, self.max_length = name, side, instruction, max_length
        rows = _read_jsonl(Path(path), ("sentence1", "sentence2", "score"), "STS")[:limit]
        self.s1 = [r["sentence1"] for r in rows]
        self.s2 = [r["sentence2"] for r in rows]
        self.gold = np.array([float(r["score"]) for r in rows])
        self.texts = list(dict.fromkeys(self.s1 + self.s2))  # each distinct sentence, embedded once
        index = {t: i for i, t in enumerate(self.texts)}
        self.left = np.array([index[t] for t in self.s1], dtype=np.int64)  # [pairs] each pair's texts
        self.right = np.array([index[t] for t in self.s2], dtype=np.int64)

    def __call__(self, embed: Embed) -> dict[str, float]:
        return {"spearman": spearman(self.cosines(embed), self.gold)}

    def cosines(self, embed: Embed) -> np.ndarray:
        """[pairs] the cosine of each pair's two sentences (tools/paired_bootstrap.py resamples them)."""
        emb = F.normalize(_embed(embed, self.texts, self.side, self.instruction, self.max_length).float(), dim=-1)
        return (emb[self.left] * emb[self.right]).sum(-1).numpy()


class RetrievalTask:
    """A folder with corpus.jsonl (id, text), queries.jsonl (id, text), qrels.jsonl
    (query_id, doc_id, score)."""

    def __init__(self, name: str, path: str, limit: int | None = None, k_values=(10, 100),
                 instruction: str | None = None, corpus_limit: int | None = None):
        folder = Path(path)
        corpus = _read_jsonl(folder / "corpus.jsonl", ("id", "text"), "corpus")
        queries = _read_jsonl(folder / "queries.jsonl", ("id", "text"), "queries")
        qrels = _read_jsonl(folder / "qrels.jsonl", ("query_id", "doc_id"), "qrels")
        self._setup(name, k_values, instruction, corpus, queries, qrels, folder, limit, corpus_limit)

    def _setup(self, name: str, k_values, instruction: str | None, corpus: list[dict], queries: list[dict],
               qrels: list[dict], folder: Path, limit: int | None, corpus_limit: int | None) -> None:
        self.name, self.k_values, self.instruction = name, tuple(k_values), instruction
        self.metrics = ("ndcg@10", "mrr@10", *(f"recall@{k}" for k in self.k_values))
        self.doc_ids = [str(r["id"]) for r in corpus]
        self.doc_texts = [r["text"] for r in corpus]
        doc_index = {d: i for i, d in enumerate(self.doc_ids)}
        self.rel: dict[str, dict[int, float]] = defaultdict(dict)
        for r in qrels:
            if str(r["doc_id"]) not in doc_index:
                raise UserError(f"{folder / 'qrels.jsonl'}: doc_id {r['doc_id']!r} is not in corpus.jsonl")
            if float(r.get("score", 1)) > 0:
                self.rel[str(r["query_id"])][doc_index[str(r["doc_id"])]] = float(r.get("score", 1))
        queries = [q for q in queries if str(q["id"]) in self.rel][:limit]
        if not queries:
            raise UserError(f"{folder}: no query has a relevant document in qrels.jsonl")
        self.query_ids = [str(q["id"]) for q in queries]
        if corpus_limit is not None and corpus_limit < len(self.doc_ids):
            self._cut_corpus(corpus_limit)
        self.query_texts = [q["text"] for q in queries]

    def _cut_corpus(self, n: int) -> None:
        """Keep every document relevant to a kept query, then the corpus's first others up to n
        in all: a smaller, easier stand-in for slow models (scores rise; compare like with like)."""
        needed = {d for q in self.query_ids for d in self.rel[q]}
        others = [i for i in range(len(self.doc_ids)) if i not in needed][: max(0, n - len(needed))]
        keep = sorted(needed.union(others))
        new = {old: k for k, old in enumerate(keep)}
        self.doc_ids = [self.doc_ids[i] for i in keep]
        self.doc_texts = [self.doc_texts[i] for i in keep]
        self.rel = defaultdict(dict, {q: {new[d]: g for d, g in self.rel[q].items()} for q in self.query_ids})

    def __call__(self, embed: Embed) -> dict[str, float]:
        q = F.normalize(_embed(embed, self.query_texts, "query", self.instruction).float(), dim=-1)
        d = F.normalize(embed(self.doc_texts, "passage").float(), dim=-1)
        _, idx = topk(q, d, max(self.k_values + (10,)))
        return ranking_metrics([idx[qi].tolist() for qi in range(len(self.query_ids))],
                               [self.rel[qid] for qid in self.query_ids], self.k_values)

    def top_k(self, embed: Embed, k: int) -> torch.Tensor:
        """[Q, k] each query's k best documents by cosine, best first (a re-ranker's candidates)."""
        q = F.normalize(_embed(embed, self.query_texts, "query", self.instruction).float(), dim=-1)
        d = F.normalize(embed(self.doc_texts, "passage").float(), dim=-1)
        return topk(q, d, min(k, len(self.doc_texts)))[1]


def ranking_metrics(ranked: list[list[int]], rels: list[dict[int, float]], k_values=()) -> dict[str, float]:
    """nDCG@10, MRR@10 and Recall@k of ranked document lists (best first) against graded relevance."""
    ndcg, mrr, recall = [], [], {k: [] for k in k_values}
    for docs, rel in zip(ranked, rels):
        dcg = sum(rel.get(doc, 0.0) / math.log2(r + 2) for r, doc in enumerate(docs[:10]))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
        ndcg.append(dcg / ideal)
        mrr.append(next((1.0 / (r + 1) for r, doc in enumerate(docs[:10]) if doc in rel), 0.0))
        for k in k_values:
            recall[k].append(sum(1 for doc in docs[:k] if doc in rel) / len(rel))
    out = {"ndcg@10": float(np.mean(ndcg)), "mrr@10": float(np.mean(mrr))}
    out.update({f"recall@{k}": float(np.mean(v)) for k, v in recall.items()})
    return out


Score = Callable[[list[tuple[str, str]]], torch.Tensor]


class RerankTask:
    """A retrieval task re-ranked: a bi-encoder's (the retriever's) top k documents of each query,
    ordered again by a cross-encoder's scores. nDCG@10 and MRR@10 of the retriever's order and of the
    re-ranked one, on the same candidates: the re-ranker's lift. Relevant documents outside the top
    k stay out of reach of both (recall@k says how many made it in)."""

    metrics = ("retriever_ndcg@10", "ndcg@10", "retriever_mrr@10", "mrr@10", "recall@k")

    def __init__(self, name: str, base: RetrievalTask, candidates: torch.Tensor):
        self.name, self.base = name, base
        self.candidates = candidates.tolist()  # [Q][k] document indices, the retriever's order
        rels = [base.rel[qid] for qid in base.query_ids]
        before = ranking_metrics(self.candidates, rels)
        self.fixed = {"retriever_ndcg@10": before["ndcg@10"], "retriever_mrr@10": before["mrr@10"],
                      "recall@k": float(np.mean([sum(d in rel for d in docs) / len(rel)
                                                 for docs, rel in zip(self.candidates, rels)]))}

    def __call__(self, score: Score) -> dict[str, float]:
        b = self.base
        pairs = [(b.query_texts[qi], b.doc_texts[d]) for qi, docs in enumerate(self.candidates) for d in docs]
        flat = score(pairs).tolist()
        ranked, at = [], 0
        for docs in self.candidates:
            mine = flat[at : at + len(docs)]
            at += len(docs)
            ranked.append([docs[j] for j in sorted(range(len(docs)), key=lambda j: -mine[j])])
        after = ranking_metrics(ranked, [b.rel[qid] for qid in b.query_ids])
        return {**self.fixed, "ndcg@10": after["ndcg@10"], "mrr@10": after["mrr@10"]}


class PairsTask(RetrievalTask):
    """(query, positive) pairs as retrieval: the first `limit` distinct queries, each over the
    positives of those queries, its own positive(s) relevant (a quick dev task from a pairs file, e.g.
    GCIDE headword -> definition). Fields by the training data's aliases (query/anchor, positive)."""

    def __init__(self, name: str, path: str, limit: int | None = None, k_values=(10, 100),
                 instruction: str | None = None, corpus_limit: int | None = None):
        from train.data import ALIASES

        file = Path(path)
        rows = _read_jsonl(file, (), "pairs")
        fields = [next((f for f in ALIASES[role] if f in rows[0]), None) for role in ("anchor", "positive")]
        if None in fields:
            role = ("query", "positive")[fields.index(None)]
            raise UserError(f"{at(file, 1)}: a pairs task needs a {role} field named one of "
                            f"{', '.join(ALIASES['anchor' if role == 'query' else 'positive'])}")
        q_field, p_field = fields
        query_ids: dict[str, str] = {}  # a headword listed twice is one query with both definitions relevant
        doc_ids: dict[str, str] = {}  # one definition shared by two headwords is one document
        qrels = []
        for line, row in enumerate(rows, 1):
            if q_field not in row or p_field not in row:
                raise UserError(f'{at(file, line)}: missing field "{q_field if q_field not in row else p_field}"')
            q, p = str(row[q_field]), str(row[p_field])
            if q not in query_ids:
                if limit is not None and len(query_ids) == limit:
                    continue
                query_ids[q] = str(len(query_ids))
            doc_ids.setdefault(p, str(len(doc_ids)))
            qrels.append({"query_id": query_ids[q], "doc_id": doc_ids[p]})
        self._setup(name, k_values, instruction, [{"id": i, "text": t} for t, i in doc_ids.items()],
                    [{"id": i, "text": t} for t, i in query_ids.items()], qrels, file, None, corpus_limit)


KINDS = {"sts": StsTask, "retrieval": RetrievalTask, "pairs": PairsTask}


def defined_tasks(tasks_cfg: dict) -> dict:
    """The tasks the chosen eval config defines. Recipes and data configs tune tasks by name
    (lora_llm's instructions, lora_llm_offline's cuts) for the eval config they are written for;
    under another one (eval=none) those names hold settings without a kind, and are left out.
    Beside tasks that are defined, such a name is a misspelling or a task that config lacks."""
    from omegaconf import OmegaConf

    defined = {n: t for n, t in tasks_cfg.items() if not OmegaConf.is_missing(t, "kind")}
    stray = [n for n in tasks_cfg if n not in defined]
    if defined and stray:
        raise UserError(f"eval.tasks.{stray[0]} has settings but no kind: it is not one of the eval config's tasks "
                        f"({', '.join(defined)}); set its kind and path, or drop it with ~eval.tasks.{stray[0]}")
    return defined


def build_tasks(tasks_cfg: dict) -> list:
    tasks = []
    for name, t in defined_tasks(tasks_cfg).items():
        if t.kind == "rerank":
            raise UserError(f"eval.tasks.{name}.kind=rerank evaluates a cross-encoder: set model.kind=cross_encoder "
                            "(recipe=reranker), or choose an embedder's task kind (sts, retrieval, pairs)")
        if t.kind not in KINDS:
            raise UserError(f"eval.tasks.{name}.kind={t.kind!r}: expected one of {', '.join(KINDS)}")
        kwargs = {"limit": t.limit, "instruction": t.get("instruction")}
        if t.kind == "sts":
            kwargs["side"], kwargs["max_length"] = t.side, t.get("max_length")
        elif t.get("max_length") is not None:
            raise UserError(f"eval.tasks.{name}.max_length={t.max_length}: a length per task is an sts task's "
                            f"setting (long documents); a {t.kind} task reads model.max_length")
        elif t.get("corpus_limit") is not None:
            kwargs["corpus_limit"] = t.corpus_limit
        tasks.append(KINDS[t.kind](name, t.path, **kwargs))
    return tasks


def rerank_bases(tasks_cfg: dict) -> list[tuple[str, RetrievalTask, str, int]]:
    """(name, retrieval task, retriever, k) of each rerank task; a cross-encoder has no embedding, so
    any other kind of task is refused. The path: a retrieval folder (corpus/queries/qrels.jsonl) or a
    (query, positive) pairs file."""
    out = []
    for name, t in defined_tasks(tasks_cfg).items():
        if t.kind != "rerank":
            raise UserError(f"eval.tasks.{name}.kind={t.kind}: a cross-encoder (model.kind=cross_encoder) scores "
                            "pairs and has no embedding; expected kind=rerank (or eval=none)")
        if not t.get("retriever"):
            raise UserError(f"eval.tasks.{name}.retriever is not set: expected the bi-encoder whose top "
                            f"{t.top_k} documents per query are re-ranked")
        if t.top_k < 1:
            raise UserError(f"eval.tasks.{name}.top_k={t.top_k}: expected a positive number of candidates")
        kind = RetrievalTask if Path(t.path).is_dir() else PairsTask
        base = kind(name, t.path, limit=t.limit, corpus_limit=t.get("corpus_limit"))
        out.append((name, base, str(t.retriever), int(t.top_k)))
    return out


def run_tasks(tasks: list, embed: Embed, dims: list[int] | None = None) -> dict[str, float]:
    """Flat metrics: {"snli_sts/spearman": 0.81, "snli_ir/ndcg@10": 0.70, ...}; with `dims`, also
    each task on the first d dimensions, re-normalised ("snli_sts@64/spearman"): how a
    Matryoshka-trained embedding holds up when truncated. `embed` caches, so every dim
    reuses one encoding."""
    out: dict[str, float] = {}
    for dim in [None, *(dims or [])]:
        use = embed if dim is None else _truncating(embed, dim)
        for task in tasks:
            for metric, value in task(use).items():
                out[f"{task.name}{'' if dim is None else f'@{dim}'}/{metric}"] = value
    return out


def metric_names(tasks: list, dims: list[int] | None = None) -> list[str]:
    """The names run_tasks returns, without running anything."""
    return [f"{t.name}{'' if d is None else f'@{d}'}/{m}" for d in [None, *(dims or [])] for t in tasks
            for m in t.metrics]


@dataclass
class Selection:
    """The best evaluated step by one metric, higher is better (SimCSE, arXiv 2104.08821, appendix A:
    STS-B dev every 250 steps, the best checkpoint kept). Its state goes into every checkpoint, so
    a preempted and resumed run keeps the step it had chosen."""

    metric: str
    step: int | None = None
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # all of the best step's figures

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Whether `step` is the new best; a tie keeps the earlier step."""
        value = metrics[self.metric]
        if self.value is not None and not value > self.value:
            return False
        self.step, self.value, self.metrics = step, float(value), dict(metrics)
        return True

    def state_dict(self) -> dict:
        return {"metric": self.metric, "step": self.step, "value": self.value, "metrics": self.metrics}

    def load_state_dict(self, state: dict) -> None:
        if state["metric"] != self.metric:
            raise UserError(f"eval.select={self.metric}: the checkpoint selected by {state['metric']}; "
                            "resume with the same eval.select")
        self.step, self.value, self.metrics = state["step"], state["value"], dict(state["metrics"])


def _embed(embed: Embed, texts: list[str], side: str | None, instruction: str | None,
           max_length: int | None = None) -> torch.Tensor:
    """An instruction (E5-Mistral's query instructions) or a length reaches `embed` only when a task
    has one: any `embed(texts, side)` serves the others."""
    kw = {k: v for k, v in (("instruction", instruction), ("max_length", max_length)) if v}
    return embed(texts, side, **kw)


def _truncating(embed: Embed, dim: int) -> Embed:
    def cut(texts: list[str], side: str | None, **kw) -> torch.Tensor:
        return embed(texts, side, **kw)[:, :dim]  # the tasks normalise what embed returns
    return cut


def side_by_side(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """A small table of metrics before and after training."""
    width = max([len(k) for k in after] + [6])
    if not before:
        return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in after.items())
    lines = [f"{'metric':<{width}}  before   after    change"]
    for k, v in after.items():
        b = before.get(k)
        row = f"{b:.4f}   {v:.4f}   {v - b:+.4f}" if b is not None else f"-        {v:.4f}"
        lines.append(f"{k:<{width}}  {row}")
    return "\n".join(lines)
