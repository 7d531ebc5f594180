"""Hard-negative mining, the parts: (query, positive) records in, the same records with mined
negatives out, in a file that fine-tuning reads as it is (`data.path=<run dir>/mined.jsonl`).
The job that runs them in order, sharding the encoding over the ranks, is jobs/mine.py.

    records (read_source)  +  corpus (mine.corpus, or the data's own positives and negatives)
      plan       unique queries, each record's positive in the corpus, passages never negatives
      encode     queries [Q, D] and passages [N, D], sharded over the ranks (embed.embedder)
      search     the k best passages per query, exact: O(query_chunk x (doc_chunk + k)) memory
      select     rank window, positive-aware filters, the best n or n sampled        (rank 0)
      teacher    optional scores [positive, negatives...] for distillation (teacher.py)
      write      <run dir>/mined.jsonl (.parquet, or a datasets folder) + mine_summary.json

The filters are NV-Retriever's (Moreira et al., arXiv 2407.15831): mined "negatives" that score
close to the positive are often unlabelled positives, and training on them hurts; in its ablation,
dropping them relative to the positive's score (TopK-PercPos) beat naive top-k by points.
    TopK-Abs        mine.max_score    drop candidates scoring above the threshold
    TopK-MarginPos  mine.margin_pos   drop candidates scoring above positive - margin
    TopK-PercPos    mine.perc_pos     drop candidates scoring above perc x positive (0.95 best)
Whatever the settings, a query's known positives, texts equal to one of them once normalised
(case, spacing, punctuation) and copies of the query itself are never negatives, and they do
not take up a rank of the window.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from train.atomic import atomic_file, atomic_folder
from train.data import ALIASES, Source, iter_rows
from train.errors import UserError
from train.retrieval import topk

TEXT_FIELDS = ("text", "passage", "document", "contents", "content", "body", "sentence")
ID_FIELDS = ("id", "_id", "doc_id", "docid", "pid", "corpus_id")
ENCODE_BLOCK = 8192  # texts per round of sharded encoding: bounds what each round holds besides the result
FILTERS = ("max_score", "margin_pos", "perc_pos")  # applied in this order; each counts what it removed


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How negatives are chosen from a query's ranked candidates."""

    skip: int = 0  # r: the best r candidates are passed over
    window: int = 10  # w: candidates at ranks r .. r+w-1 are considered
    num_negatives: int = 4  # n per record
    sample: bool = False  # n at random from the window's survivors, else the n best
    max_score: float | None = None  # TopK-Abs
    margin_pos: float | None = None  # TopK-MarginPos
    perc_pos: float | None = None  # TopK-PercPos
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("window", "num_negatives"):
            if getattr(self, key) < 1:
                raise UserError(f"mine.{key}={getattr(self, key)}: expected a positive integer")
        if self.skip < 0:
            raise UserError(f"mine.skip={self.skip}: expected 0 or more")
        if self.num_negatives > self.window:
            raise UserError(f"mine.num_negatives={self.num_negatives} is more than the mine.window={self.window} "
                            "candidates it is chosen from; widen the window or ask for fewer")
        if self.perc_pos is not None and not 0 < self.perc_pos <= 1:
            raise UserError(f"mine.perc_pos={self.perc_pos}: expected a fraction in (0, 1], e.g. 0.95")
        if self.margin_pos is not None and self.margin_pos < 0:
            raise UserError(f"mine.margin_pos={self.margin_pos}: expected 0 or more")

    def describe(self) -> str:
        pick = f"{self.num_negatives} sampled" if self.sample else f"the best {self.num_negatives}"
        filters = [f"{f}={getattr(self, f)}" for f in FILTERS if getattr(self, f) is not None]
        return (f"{pick} of ranks {self.skip}-{self.skip + self.window - 1}, "
                f"filters: {', '.join(filters) or 'none (plain top-k)'}")


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise UserError("mine.faiss=true, but faiss is not installed: pip install faiss-cpu (or faiss-gpu), "
                        "or set mine.faiss=false for the exact chunked search (same results)") from None
    return faiss


# --- reading -------------------------------------------------------------------------------------


@dataclass
class Corpus:
    texts: list[str]  # unique
    ids: list[str] | None
    origin: str
    empty: list[int]  # lines (rows) whose text was empty: skipped
    merged: int  # repeated texts merged into one passage


def read_corpus(path: str, text_field: str | None = None, id_field: str | None = None,
                group: str = "mine") -> Corpus:
    """Passages from a JSONL/JSON/CSV/TSV/Parquet/text file (or hub dataset): a text field, an optional id.
    group: the config group whose keys (corpus, text_field, id_field) the messages name."""
    origin, rows = iter_rows(path)
    where = f"{group}.corpus={origin}"
    texts: list[str] = []
    ids: list[str] = []
    empty: list[int] = []
    first_line: dict[str, int] = {}
    repeated: list[tuple[str, int, int]] = []
    tkey = ikey = None
    for line, row in rows:
        if tkey is None:  # the first record decides the fields
            tkey = text_field or next((k for k in TEXT_FIELDS if k in row), None)
            if tkey is None or tkey not in row:
                raise UserError(f"{where}:{line}: no passage text; expected a field named one of "
                                f"{', '.join(TEXT_FIELDS)} (or set {group}.text_field), found {sorted(row)}")
            ikey = id_field or next((k for k in ID_FIELDS if k in row), None)
            if ikey is not None and ikey not in row:
                raise UserError(f'{where}:{line}: no field "{ikey}" ({group}.id_field), found {sorted(row)}')
        text = row.get(tkey)
        if text is not None and not isinstance(text, str):
            raise UserError(f'{where}:{line}: field "{tkey}" must be text, got {type(text).__name__}')
        if not text or not text.strip():
            empty.append(line)
            continue
        if ikey is not None:
            if row.get(ikey) is None:
                raise UserError(f'{where}:{line}: missing field "{ikey}" (the first record has an id)')
            pid = str(row[ikey])
            if pid in first_line:
                repeated.append((pid, first_line[pid], line))
            first_line.setdefault(pid, line)
            ids.append(pid)
        texts.append(text)
    if repeated:
        pid, a, b = repeated[0]
        raise UserError(f"{where}: {len(repeated):,} passages repeat an id used before (first: {pid!r} at lines "
                        f"{a} and {b}); ids must be unique")
    if not texts:
        raise UserError(f"{where}: no passage with text ({len(empty):,} empty)")
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    keep = list(first.values())  # the first passage of each text, in file order
    return Corpus([texts[i] for i in keep], [ids[i] for i in keep] if ikey else None, origin, empty,
                  len(texts) - len(keep))


def corpus_of(source: Source) -> Corpus:
    """Without mine.corpus: every distinct positive and negative text of the data."""
    texts = list(source.positives) + [t for negs in source.negatives for t in negs]
    unique = list(dict.fromkeys(texts))
    return Corpus(unique, None, f"the positives and negatives of {source.origin}", [], len(texts) - len(unique))


def count_empty(path: str) -> str:
    """One message with every record whose query or positive is empty, not only the first."""
    origin, rows = iter_rows(path)
    keys, bad, total = None, [], 0
    for line, row in rows:
        total += 1
        if keys is None:
            keys = [next((k for k in ALIASES[r] if k in row), None) for r in ("anchor", "positive")]
        if any(k is None or not isinstance(row.get(k), str) or not row[k].strip() for k in keys):
            bad.append(line)
    lines = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return (f"{origin}: {len(bad):,} of {total:,} records have an empty or missing query or positive "
            f"(lines {lines}); remove them before mining")


# --- plan: what is a query, where each positive is, what is never a negative --------------------


def normalize_text(text: str) -> str:
    """Case, spacing and punctuation folded away: 'A man laughing.' == 'a man  laughing'."""
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).split())


@dataclass
class QueryPlan:
    queries: list[str]  # unique query texts [Q]
    rec_query: torch.Tensor  # [R] record -> query
    rec_pos: torch.Tensor  # [R] record -> its positive's passage; -1: not in the corpus
    never: torch.Tensor  # sorted q * N + passage: pairs that are never negatives
    max_never: int  # the most such passages of one query


def make_plan(anchors: Sequence[str], positives: Sequence[str], corpus: Sequence[str]) -> QueryPlan:
    n = len(corpus)
    queries = list(dict.fromkeys(anchors))
    qidx = {q: i for i, q in enumerate(queries)}
    keys: list[set[str]] = [{normalize_text(q)} for q in queries]  # a copy of the query is no negative
    pos_keys = [normalize_text(p) for p in positives]
    for a, key in zip(anchors, pos_keys):
        keys[qidx[a]].add(key)
    # One pass over the corpus, keeping only the passages the records ask about: the plan's memory
    # follows the records, not the corpus (which may be millions of passages).
    wanted, wanted_keys = set(positives), set().union(*keys) - {""}
    exact: dict[str, int] = {}
    by_key: dict[str, list[int]] = {}
    for i, t in enumerate(corpus):
        if t in wanted:
            exact.setdefault(t, i)
        key = normalize_text(t)
        if key in wanted_keys:
            by_key.setdefault(key, []).append(i)
    rec_pos = [exact[p] if p in exact else (by_key.get(k) or [-1])[0] for p, k in zip(positives, pos_keys)]
    never, most = [], 0
    for q, ks in enumerate(keys):
        found = sorted({i for k in ks for i in by_key.get(k, ())})
        never += [q * n + i for i in found]
        most = max(most, len(found))
    return QueryPlan(queries, torch.tensor([qidx[a] for a in anchors], dtype=torch.long),
                torch.tensor(rec_pos, dtype=torch.long), torch.tensor(never, dtype=torch.long), most)


def check_depth(rule: Rule, corpus_size: int, origin: str) -> None:
    need = rule.skip + rule.window
    if need > corpus_size:
        raise UserError(f"mine.skip={rule.skip} + mine.window={rule.window} = {need} ranks, but the corpus "
                        f"({origin}) has only {corpus_size:,} passages; lower mine.window or mine.skip")


# --- encode (every rank) -------------------------------------------------------------------------


def embed_all(embed_block: Callable[[list[str], str], torch.Tensor], texts: list[str], side: str,
              world_size: int, log: Callable[[str], None] = lambda s: None) -> torch.Tensor:
    """[N, D] L2-normalised embeddings of unique texts, a block at a time.

    `embed_block` shares each block over the ranks; a block too small to give every rank a text
    joins the block before it. Scores are cosines, as in evaluation, whatever the model's own
    normalisation, so thresholds mean the same for every model.
    """
    if len(texts) < world_size:
        raise UserError(f"{len(texts)} {side} texts cannot be shared by {world_size} ranks; launch fewer ranks")
    starts = list(range(0, len(texts), ENCODE_BLOCK))
    if len(starts) > 1 and len(texts) - starts[-1] < world_size:
        starts.pop()
    out: torch.Tensor | None = None
    t0 = time.perf_counter()
    for b, s in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(texts)
        emb = F.normalize(embed_block(texts[s:end], side).float(), dim=-1)  # [block, D]
        if out is None:
            out = torch.empty((len(texts), emb.shape[1]))
        out[s:end] = emb
        log(f"encoded {end:,}/{len(texts):,} {side} texts ({time.perf_counter() - t0:.0f} s)")
    return out


# --- search (rank 0) -----------------------------------------------------------------------------


def search(q: torch.Tensor, c: torch.Tensor, k: int, query_chunk: int = 1024, doc_chunk: int = 16384,
           use_faiss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """queries [Q, D], passages [N, D] -> (scores [Q, k], indices [Q, k]): exact top-k by inner product,
    best first, equal scores by passage index, so the order does not depend on how it was computed."""
    if use_faiss:
        s, i = _faiss_search(q, c, k, query_chunk)
    else:
        s, i = topk(q, c, k, query_chunk=query_chunk, doc_chunk=doc_chunk)
    by_index = i.argsort(dim=1, stable=True)
    s, i = s.gather(1, by_index), i.gather(1, by_index)
    by_score = s.argsort(dim=1, descending=True, stable=True)
    return s.gather(1, by_score), i.gather(1, by_score)


def _faiss_search(q: torch.Tensor, c: torch.Tensor, k: int, query_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    faiss = faiss_module()
    index = faiss.IndexFlatIP(c.shape[1])  # exact inner product: the same result as the chunked search
    index.add(c.contiguous().numpy())
    parts = [index.search(q[s : s + query_chunk].contiguous().numpy(), k) for s in range(0, q.shape[0], query_chunk)]
    return (torch.cat([torch.from_numpy(s) for s, _ in parts]).float(),
            torch.cat([torch.from_numpy(i) for _, i in parts]).long())


def never_mask(cand: torch.Tensor, never: torch.Tensor, corpus_size: int) -> torch.Tensor:
    """cand [Q, k] passage indices -> [Q, k] bool: the passage is never a negative of that query."""
    q = torch.arange(cand.shape[0]).unsqueeze(1)  # [Q, 1]
    return torch.isin(q * corpus_size + cand, never)


def positive_scores(q: torch.Tensor, c: torch.Tensor, rec_query: torch.Tensor, rec_pos: torch.Tensor,
                    chunk: int = 65536) -> torch.Tensor:
    """[R] score of each record's query with its own positive (records with rec_pos >= 0)."""
    out = torch.empty(rec_query.shape[0])
    for s in range(0, rec_query.shape[0], chunk):
        out[s : s + chunk] = (q[rec_query[s : s + chunk]] * c[rec_pos[s : s + chunk]]).sum(-1)  # [chunk]
    return out


# --- select (pure) -------------------------------------------------------------------------------


@dataclass
class Chosen:
    keep: torch.Tensor  # [R] bool: the record got num_negatives negatives
    idx: torch.Tensor  # [R, n] passages, best first (valid where keep)
    scores: torch.Tensor  # [R, n]
    dropped: torch.Tensor  # [M] scores of window candidates a filter removed
    removed: dict[str, int]  # known_positive and each filter: candidates removed
    not_taken: int  # passed the filters but were not among the n taken
    top_is_positive: int  # records whose best candidate is a known positive


def select(cand_s: torch.Tensor, cand_i: torch.Tensor, never: torch.Tensor, rec_query: torch.Tensor,
           pos: torch.Tensor, rule: Rule) -> Chosen:
    """Negatives of each record from its query's ranked candidates.

    cand_s, cand_i, never: [Q, k] scores, passages, never-negative flags, best first;
    rec_query [R] record -> query; pos [R] the record's positive score.
    """
    s, i, known = cand_s[rec_query], cand_i[rec_query], never[rec_query]  # [R, k]
    r, k = s.shape
    n = rule.num_negatives
    end = rule.skip + rule.window
    rank = (~known).cumsum(1) - 1  # rank among the candidates that may be negatives  [R, k]
    window = ~known & (rank >= rule.skip) & (rank < end)  # [R, k]
    removed = {"known_positive": int((known & (rank + 1 < end)).sum())}  # met before the window's end

    p = pos.unsqueeze(1)  # [R, 1]
    drops = {
        "max_score": lambda: s > rule.max_score,  # TopK-Abs
        "margin_pos": lambda: s > p - rule.margin_pos,  # TopK-MarginPos
        # TopK-PercPos: perc x positive, written p - |p| (1 - perc) so a negative positive score keeps the
        # threshold below the positive instead of above it.
        "perc_pos": lambda: s > p - p.abs() * (1 - rule.perc_pos),
    }
    alive = window.clone()
    for name in FILTERS:
        if getattr(rule, name) is None:
            continue
        drop = drops[name]()
        removed[name] = int((alive & drop).sum())
        alive &= ~drop
    left = alive.sum(1)  # [R]
    keep = left >= n

    col = torch.arange(k).expand(r, k)  # [R, k]
    if rule.sample:
        # n of the survivors uniformly at random: the n smallest of random keys; seeded, so a rerun
        # (or a run on another number of ranks, which selects on rank 0 alike) picks the same.
        key = torch.rand((r, k), generator=torch.Generator().manual_seed(rule.seed))
        key[~alive] = 2.0
        pick = key.topk(n, dim=1, largest=False).indices.sort(dim=1).values  # [R, n], in rank order
    else:
        pick = torch.where(alive, col, k).sort(dim=1).values[:, :n].clamp(max=k - 1)  # first n survivors
    return Chosen(keep=keep, idx=i.gather(1, pick), scores=s.gather(1, pick), dropped=s[window & ~alive],
                  removed=removed, not_taken=int((left - n).clamp(min=0)[keep].sum()),
                  top_is_positive=int(known[:, 0].sum()))


# --- summary and output --------------------------------------------------------------------------


def score_stats(x: torch.Tensor) -> dict:
    """count, mean and quantiles of a score distribution (empty: count 0)."""
    x = x.float().flatten()
    if x.numel() == 0:
        return {"count": 0}
    qs = (0.05, 0.25, 0.5, 0.75, 0.95)
    # torch.quantile takes at most 2^24 values: beyond that, quantiles of a fixed random sample.
    sample = x if x.numel() <= 2**24 else x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))
                                            [: 2**24]]
    out = {"count": int(x.numel()), "mean": float(x.mean()), "min": float(x.min())}
    out.update({f"p{int(q * 100):02d}": float(v) for q, v in zip(qs, torch.quantile(sample, torch.tensor(qs)))})
    out["max"] = float(x.max())
    return out


def format_summary(summary: dict) -> str:
    c, rm = summary["counts"], summary["removed"]
    lines = [
        f"mined {c['written']:,} of {c['records']:,} records -> {summary['output'] or 'nothing written'}",
        f"  {c['queries']:,} queries, corpus {c['corpus']:,} passages ({summary['corpus']}; "
        f"{c['corpus_merged']:,} repeated texts merged, {c['corpus_empty']:,} empty skipped), "
        f"{c['retrieved']} retrieved per query",
        f"  {summary['rule']}",
        f"  skipped {c['skipped_positive_not_in_corpus']:,} records whose positive is not in the corpus, "
        f"{c['skipped_too_few']:,} left with fewer than {summary['settings']['num_negatives']} negatives",
        "  removed: " + ", ".join(f"{k} {v:,}" for k, v in rm.items())
        + f"; passed the filters but not taken {summary['not_taken']:,}",
        f"  best candidate is a known positive for {summary['top_is_positive']:.1%} of records",
        f"  {'scores':<18}{'count':>10}{'mean':>8}{'p05':>8}{'p25':>8}{'p50':>8}{'p75':>8}{'p95':>8}",
    ]
    for name, d in summary["scores"].items():
        if d["count"]:
            lines.append(f"  {name:<18}{d['count']:>10,}{d['mean']:>8.3f}"
                         + "".join(f"{d[q]:>8.3f}" for q in ("p05", "p25", "p50", "p75", "p95")))
        else:
            lines.append(f"  {name:<18}{0:>10}")
    return "\n".join(lines)


def mined_records(source: Source, corpus: Corpus, rows: list[int], negatives: list[list[int]]) -> list[dict]:
    """The output records: each kept record's query and positive with its negatives' texts (and ids)."""
    records = []
    for r, negs in zip(rows, negatives):
        rec = {"query": source.anchors[r], "positive": source.positives[r],
               "negatives": [corpus.texts[j] for j in negs]}
        if corpus.ids is not None:
            rec["negative_ids"] = [corpus.ids[j] for j in negs]
        records.append(rec)
    return records


def write_records(records: list[dict], run_dir: Path, fmt: str) -> Path:
    """<run dir>/mined.jsonl | mined.parquet | mined/ (datasets), written under a temporary name and
    renamed, so an interrupted run never leaves a file that looks complete."""
    if fmt == "datasets":
        import datasets

        with atomic_folder(run_dir / "mined") as tmp:
            datasets.Dataset.from_list(records).save_to_disk(str(tmp))
        return run_dir / "mined"
    out = run_dir / f"mined.{fmt}"
    with atomic_file(out) as tmp:
        if fmt == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(records), tmp)
    return out


def lines_of(rows: torch.Tensor, limit: int = 5) -> str:
    """Record indices as the 1-based lines a user finds them at: '3, 9, 12, ...'."""
    first = [str(int(x) + 1) for x in rows[:limit]]
    return ", ".join(first) + (", ..." if rows.numel() > limit else "")
