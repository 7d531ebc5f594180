"""job=mine: hard-negative mining over built inputs (build.mine_inputs). Every rank encodes its share
of queries and passages; rank 0 searches, selects, scores with the teacher and writes. The parts
(plan, search, select, summary, output) are in train/mining.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from train import mining
from train.atomic import write_json
from train.build import Mining
from train.dist import World
from train.embed import embedder
from train.errors import UserError
from train.log import say


def encode_both(encoder, world: World, queries: list[str], passages: list[str], batch_size: int,
                log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (query prompt) and passages (passage prompt), each rank encoding its share; the
    encoder is dropped on return, before a teacher loads."""
    encoder = encoder.to(world.device).eval()

    def embed_block(texts: list[str], side: str) -> torch.Tensor:
        # A fresh embedder per block: its cache then holds one block, not the whole corpus.
        return embedder(encoder, world, batch_size)(texts, side)

    return (mining.embed_all(embed_block, queries, "query", world.size, log),
            mining.embed_all(embed_block, passages, "passage", world.size, log))


def run(job: Mining, world: World, run_dir: Path) -> dict:
    m, rule, source, corpus = job.settings, job.rule, job.source, job.corpus
    log = say if world.is_main else (lambda s: None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    # --- plan: its errors come before a model loads ----------------------------------------------------
    if corpus.empty:
        log(f"mine.corpus: skipped {len(corpus.empty):,} passages with empty text "
            f"(lines {', '.join(map(str, corpus.empty[:5]))}{', ...' if len(corpus.empty) > 5 else ''})")
    mining.check_depth(rule, len(corpus.texts), corpus.origin)
    plan = mining.make_plan(source.anchors, source.positives, corpus.texts)
    missing = (plan.rec_pos < 0).nonzero().flatten()
    if missing.numel() == len(source):
        raise UserError(f"no positive of {source.origin} is in mine.corpus={corpus.origin} (all {len(source):,} "
                        "records); is it the right corpus? (matched by text, ignoring case and punctuation)")
    if missing.numel():
        log(f"skipping {missing.numel():,} of {len(source):,} records: their positive is not in the corpus "
            f"(records {mining.lines_of(missing)})")
    k = min(len(corpus.texts), rule.skip + rule.window + plan.max_never)
    log(f"world size {world.size}: mining {len(source):,} records ({len(plan.queries):,} queries) against "
        f"{len(corpus.texts):,} passages; {rule.describe()}")
    seconds["read"] = time.perf_counter() - t

    # --- encode, shared by the ranks ----------------------------------------------------------------------
    t = time.perf_counter()
    q, c = encode_both(job.make_encoder(), world, plan.queries, corpus.texts, m.batch_size, log)  # [Q, D], [N, D]
    seconds["encode"] = time.perf_counter() - t
    if not world.is_main:
        return {"after": {}}

    # --- search and select (rank 0) ------------------------------------------------------------------------
    t = time.perf_counter()
    cand_s, cand_i = mining.search(q, c, k, m.query_chunk, m.doc_chunk, m.faiss)  # [Q, k]
    seconds["search"] = time.perf_counter() - t
    t = time.perf_counter()
    valid = (plan.rec_pos >= 0).nonzero().flatten()  # [R']
    pos = mining.positive_scores(q, c, plan.rec_query[valid], plan.rec_pos[valid])  # [R']
    chosen = mining.select(cand_s, cand_i, mining.never_mask(cand_i, plan.never, len(corpus.texts)),
                           plan.rec_query[valid], pos, rule)
    rows, too_few = valid[chosen.keep], valid[~chosen.keep]
    if too_few.numel():
        log(f"skipping {too_few.numel():,} records left with fewer than {rule.num_negatives} negatives in ranks "
            f"{rule.skip}-{rule.skip + rule.window - 1} after the filters (records {mining.lines_of(too_few)})")
    neg_idx, neg_s = chosen.idx[chosen.keep], chosen.scores[chosen.keep]  # [W, n]
    records = mining.mined_records(source, corpus, rows.tolist(), neg_idx.tolist())
    seconds["select"] = time.perf_counter() - t

    # --- teacher scores, for distillation -----------------------------------------------------------------
    scores = {"positive": mining.score_stats(pos), "kept": mining.score_stats(neg_s),
              "dropped": mining.score_stats(chosen.dropped)}
    if m.teacher and records:
        from train import teacher

        t = time.perf_counter()
        log(f"teacher {m.teacher}: scoring {len(records):,} x {1 + rule.num_negatives} pairs")
        ts = teacher.score(m.teacher, [r["query"] for r in records],
                           [[r["positive"], *r["negatives"]] for r in records], batch_size=m.teacher_batch_size,
                           max_length=m.teacher_max_length, device=world.device)
        for rec, s in zip(records, ts):
            rec["scores"] = s
        tt = torch.tensor(ts)  # [W, 1+n]
        scores.update({"teacher_positive": mining.score_stats(tt[:, 0]),
                       "teacher_negative": mining.score_stats(tt[:, 1:])})
        seconds["teacher"] = time.perf_counter() - t

    # --- write ---------------------------------------------------------------------------------------------
    t = time.perf_counter()
    summary = {
        "world_size": world.size, "model": job.model, "data": source.origin, "corpus": corpus.origin,
        "output": None, "rule": rule.describe(), "settings": {**asdict(rule), "teacher": m.teacher, "faiss": m.faiss},
        "counts": {"records": len(source), "queries": len(plan.queries), "corpus": len(corpus.texts),
                   "corpus_merged": corpus.merged, "corpus_empty": len(corpus.empty), "retrieved": k,
                   "written": len(records), "skipped_positive_not_in_corpus": int(missing.numel()),
                   "skipped_too_few": int(too_few.numel())},
        "removed": chosen.removed, "not_taken": chosen.not_taken,
        "top_is_positive": chosen.top_is_positive / max(1, valid.numel()),
        "scores": scores, "seconds": seconds,
    }
    if not records:
        # Fail, so that a pipeline stops here and not at a missing file, but only after writing the
        # summary: its score distributions tell which setting to loosen.
        write_json(run_dir / "mine_summary.json", summary)
        print(mining.format_summary(summary), flush=True)
        raise UserError(f"no record kept: all {valid.numel():,} records with a positive in the corpus have fewer "
                        f"than {rule.num_negatives} negatives left in ranks {rule.skip}-{rule.skip + rule.window - 1} "
                        f"(removed: {', '.join(f'{k} {v:,}' for k, v in chosen.removed.items())}); widen "
                        "mine.window, lower mine.num_negatives or loosen the filters (score distributions in "
                        f"{run_dir / 'mine_summary.json'})")
    out = mining.write_records(records, run_dir, str(m.format))
    seconds["write"] = time.perf_counter() - t
    summary["output"] = str(out)
    write_json(run_dir / "mine_summary.json", summary)
    print(mining.format_summary(summary), flush=True)
    metrics = {"mine/written": float(len(records)), "mine/skipped": float(len(source) - len(records)),
               "mine/positive_mean": scores["positive"]["mean"], "mine/kept_mean": scores["kept"]["mean"]}
    return {"after": {k: v for k, v in metrics.items() if not math.isnan(v)}, "output": str(out),
            "summary": summary}
