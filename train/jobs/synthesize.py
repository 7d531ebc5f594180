"""job=synthesize: an LLM writes queries for each passage, a retriever keeps the consistent pairs.
The parts (prompt, generate, parse, filter) are in train/synthesis.py.

    plan       synth_plan.json in synth.out: what the shards were generated with; a rerun with
               the same plan resumes, with another is refused
    generate   shard s (synth.shard_size passages) on rank s % W, each written atomically to
               shards/shard-NNNNN.jsonl; finished shards are skipped on a rerun. Per passage:
               with synth.task_prompt first a task description, then synth.queries_per_passage
               queries (one row each), every one its own seeded draw
    filter     queries and the whole corpus encoded by the retriever (model.path), sharded over the
               ranks; rank 0 ranks the corpus for each query and keeps the pair when its passage is
               within synth.top_k (optionally relabelling the positive, adding hard negatives);
               each query on its own, after a passage's repeated queries are dropped
    write      synthetic.jsonl (kept, fields query/positive[/negatives][/task]: train with
               data.path=<out>/synthetic.jsonl), synthetic_unfiltered.jsonl, synth_summary.json
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from train import dist, mining, synthesis
from train.atomic import atomic_file, write_json
from train.build import Synthesis
from train.dist import World
from train.errors import UserError
from train.jobs.mine import encode_both
from train.log import say

PASS_AT = (1, 3, 10)  # pass rates reported besides synth.top_k's
# Plan keys added after folders were first written, with the value those folders were written under.
PLAN_DEFAULTS = {"task_prompt": None, "max_task_tokens": None, "queries_per_passage": 1}


def plan_of(job: Synthesis) -> dict:
    """What decides the generated text: a shard folder is reused only under the same plan. The batch
    size and the number of ranks are not in it: the output does not depend on them."""
    s, c = job.settings, job.corpus
    h = hashlib.sha256()
    for i in range(job.sources):
        h.update(f"{c.ids[i] if c.ids else i}\x00{c.texts[i]}\x00".encode())
    return {"generator": str(s.generator), "prompt": str(s.prompt), "max_passage_tokens": s.max_passage_tokens,
            "max_new_tokens": s.max_new_tokens, "temperature": float(s.temperature), "seed": job.seed,
            "shard_size": s.shard_size, "passages": job.sources, "passages_sha256": h.hexdigest(),
            "task_prompt": s.task_prompt, "max_task_tokens": s.max_task_tokens if s.task_prompt else None,
            "queries_per_passage": s.queries_per_passage}


def check_plan(out: Path, plan: dict) -> None:
    path = out / "synth_plan.json"
    if not path.is_file():
        return
    old = PLAN_DEFAULTS | json.loads(path.read_text())
    changed = [k for k in plan if old.get(k) != plan[k]]
    if changed:
        k = changed[0]
        raise UserError(f"synth.out={out}: its shards were generated with {k}={old.get(k)!r}, this run has "
                        f"{plan[k]!r}{' (and ' + ', '.join(changed[1:]) + ')' if changed[1:] else ''}; "
                        "use a new synth.out, or the same settings to resume")


def batches(items: list, size: int):
    return (items[b:b + size] for b in range(0, len(items), size))


def shard_rows(job: Synthesis, model, tok, passages: range) -> list[dict]:
    """One shard's rows, (passage, draw) in order. Every reply has its own seed, so neither the batches
    nor which rank writes the shard change it."""
    s, c = job.settings, job.corpus
    pid = (lambda j: c.ids[j]) if c.ids else str
    tasks: dict[int, tuple[str, str]] = {}  # passage -> (raw reply, parsed task)
    if s.task_prompt:  # stage 1 (E5-Mistral / Gecko): a task description for each passage
        for idx in batches(list(passages), s.batch_size):
            prompts = [synthesis.render(tok, s.task_prompt, c.texts[j], s.max_passage_tokens) for j in idx]
            replies = synthesis.generate(model, tok, prompts, [synthesis.task_seed(job.seed, pid(j)) for j in idx],
                                         s.max_task_tokens, s.temperature)
            tasks |= {j: (r, synthesis.parse_task(r)) for j, r in zip(idx, replies)}
    # stage 2: the queries; a passage whose task reply held no task gets none (counted at the filter)
    items = [(j, d) for j in passages for d in range(s.queries_per_passage) if not tasks or tasks[j][1]]
    replies: dict[tuple[int, int], str] = {}
    for batch in batches(items, s.batch_size):
        prompts = [synthesis.render(tok, s.prompt, c.texts[j], s.max_passage_tokens, tasks[j][1] if tasks else None)
                   for j, _ in batch]
        seeds = [synthesis.draw_seed(job.seed, pid(j), d) for j, d in batch]
        replies |= dict(zip(batch, synthesis.generate(model, tok, prompts, seeds, s.max_new_tokens, s.temperature)))
    return [{"index": j, "id": pid(j), "draw": d,
             **({"task_reply": tasks[j][0], "task": tasks[j][1]} if tasks else {}), "reply": replies.get((j, d), "")}
            for j in passages for d in range(s.queries_per_passage)]


def generate_shards(job: Synthesis, world: World, log) -> int:
    """This rank's missing shards; returns how many it generated."""
    s = job.settings
    shards = synthesis.shard_ranges(job.sources, s.shard_size)
    todo = [i for i in range(world.rank, len(shards), world.size)
            if not synthesis.shard_path(job.out, i).is_file()]
    if not todo:
        return 0
    model, tok = synthesis.load_generator(str(s.generator), world.device)
    t0, done = time.perf_counter(), 0
    for i in todo:
        rows = shard_rows(job, model, tok, shards[i])
        with atomic_file(synthesis.shard_path(job.out, i)) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        done += len(shards[i])
        log(f"shard {i}: {len(rows)} queries ({done / (time.perf_counter() - t0):.2f} passages/s on this rank)")
    return len(todo)


def run(job: Synthesis, world: World, run_dir: Path) -> dict:
    s, c = job.settings, job.corpus
    log = say if world.is_main else (lambda m: None)
    seconds: dict[str, float] = {}

    # --- plan: refuse another plan's folder before anything is written ------------------------------
    plan = plan_of(job)
    check_plan(job.out, plan)
    if world.is_main:
        write_json(job.out / "synth_plan.json", plan)
    dist.barrier()
    n_shards = len(synthesis.shard_ranges(job.sources, s.shard_size))
    log(f"world size {world.size}: queries for {job.sources:,} of {len(c.texts):,} passages ({c.origin}), "
        f"{n_shards} shards of {s.shard_size} in {job.out / 'shards'}; generator {s.generator}")

    # --- generate: each rank its shards; agree() waits for all and names a rank that failed ----------
    t = time.perf_counter()
    made = dist.agree(world, lambda: generate_shards(job, world, say), "generating queries")
    seconds["generate"] = time.perf_counter() - t
    # The shards hold the raw replies; parsing them here means a rerun with a better parser reuses them.
    rows = [{**r, "query": synthesis.parse_query(r["reply"])}
            for i, rng in enumerate(synthesis.shard_ranges(job.sources, s.shard_size))
            for r in synthesis.read_shard(synthesis.shard_path(job.out, i), rng, s.queries_per_passage)]
    pairs = synthesis.distinct_queries(rows)
    empty = sum(not r["query"] for r in rows)
    no_task = sum(1 for r in rows if "task" in r and not r["task"])
    log(f"generated {made} shards on rank 0 ({n_shards - made} were there); {len(pairs):,} of {len(rows):,} "
        f"replies hold a new query ({empty:,} none{f', {no_task:,} for lack of a task' if s.task_prompt else ''}, "
        f"{len(rows) - empty - len(pairs):,} repeated for their passage)")
    if not pairs:
        raise UserError(f"no query could be read from the generator's {len(rows):,} replies (e.g. "
                        f"{rows[0]['reply']!r}); check synth.prompt and synth.generator")

    # --- filter: encode sharded, rank on rank 0 ------------------------------------------------------
    t = time.perf_counter()
    q, p = encode_both(job.make_encoder(), world, [r["query"] for r in pairs], c.texts, s.batch_size_filter,
                       log)  # [Q, D], [N, D]
    seconds["encode"] = time.perf_counter() - t
    if not world.is_main:
        return {"after": {}}
    m = min(len(c.texts), max(s.top_k + s.num_negatives + 1, *PASS_AT))
    _, cand = mining.search(q, p, m)  # [Q, m] best first, ties by passage index
    source = torch.tensor([r["index"] for r in pairs])  # [Q]
    f = synthesis.consistency(cand, source, s.top_k, s.relabel, s.num_negatives)

    # --- write ----------------------------------------------------------------------------------------
    def record(j: int, positive: int, negatives: list[int] | None) -> dict:
        rec = {"query": pairs[j]["query"], "positive": c.texts[positive]}
        if negatives is not None:
            rec["negatives"] = [c.texts[x] for x in negatives]
        if s.task_prompt:  # what the query was written for: an instruction for it (model.instruction_template)
            rec["task"] = pairs[j]["task"]
        rec["source_id"], rec["source_rank"] = pairs[j]["id"], int(f.rank[j])
        return rec

    kept = [record(j, int(f.positive[j]), f.negatives[j].tolist() if s.num_negatives else None)
            for j in f.keep.nonzero().flatten().tolist()]
    everything = [record(j, int(source[j]), None) for j in range(len(pairs))]
    for name, recs in (("synthetic.jsonl", kept), ("synthetic_unfiltered.jsonl", everything)):
        with atomic_file(job.out / name) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    ranks = f.rank
    summary = {
        "world_size": world.size, "generator": str(s.generator), "retriever": job.model, "corpus": c.origin,
        "output": str(job.out / "synthetic.jsonl"),
        "settings": {"top_k": s.top_k, "relabel": s.relabel, "num_negatives": s.num_negatives,
                     "temperature": float(s.temperature), "seed": job.seed, "task_stage": bool(s.task_prompt),
                     "queries_per_passage": s.queries_per_passage},
        "counts": {"passages": job.sources, "corpus": len(c.texts), "replies": len(rows), "queries": len(pairs),
                   "empty_query": empty, "no_task": no_task, "repeated_query": len(rows) - empty - len(pairs),
                   "kept": len(kept),
                   "relabelled": int((f.keep & (f.positive != source)).sum())},
        "pass_rate": len(kept) / len(pairs),
        "pass_rate_at": {str(k): float(((ranks >= 0) & (ranks < k)).float().mean()) for k in PASS_AT if k <= m},
        "rank_histogram": {str(k): int((ranks == k).sum()) for k in range(m)} | {"beyond": int((ranks < 0).sum())},
        "seconds": seconds,
    }
    write_json(job.out / "synth_summary.json", summary)
    say(f"kept {len(kept):,} of {len(pairs):,} synthetic pairs ({summary['pass_rate']:.1%}: passage within the "
        f"top {s.top_k} of {len(c.texts):,}) -> {summary['output']}; pass rate at "
        + ", ".join(f"{k}: {v:.1%}" for k, v in summary["pass_rate_at"].items()))
    return {"after": {"synth/kept": float(len(kept)), "synth/pass_rate": summary["pass_rate"]},
            "output": summary["output"], "summary": summary}
