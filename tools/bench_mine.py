"""Benchmark of hard-negative mining (recipe=mine_hard_negatives, train/mining.py) on a real model and
real data, side by side with sentence-transformers' `util.mine_hard_negatives`.

Data: the GCIDE dictionary asset ("gcide": (headword, definition) pairs; SNLI pairs and sentences
when it cannot be fetched). Queries: the first --queries records (a headword with several
definitions is one query with several positives). Corpus: the first --passages distinct definitions
in file order, which hold every query's positives. Model: all-MiniLM-L6-v2 (asset "minilm"),
truncated to --max-length tokens, float32, batches of --batch-size texts.

Settings, the same for both: TopK-PercPos 0.95 (ours `mine.perc_pos=0.95`; sentence-transformers
`relative_margin=0.05`, which keeps a candidate at most positive - 0.05 |positive|, the same
threshold), 4 negatives from the top 10 (`mine.window=10`; `range_max=10`), the best ones
(`sampling_strategy="top"`), exact search (no faiss). sentence-transformers runs with its default
`faiss_batch_size` (16384 queries per similarity block) and, with --st-chunk, again with that many.

Each configuration runs in a fresh process (this file with --worker). Memory on CPU: peak RSS
(VmHWM) of the whole process, and its rise over the RSS measured after the imports, just before
the model loads (the kernel's high-water mark is reset there through /proc/self/clear_refs); the
rise includes the model (about 90 MiB), the texts, tokenization, the embeddings and the search.
Workers run with MALLOC_MMAP_THRESHOLD_=1048576 (as tools/bench_gradcache.py does), so large
freed blocks go back to the kernel and the high-water mark follows what is really held. Time:
the wall time of the mining call alone (model load included, interpreter start and imports not).

Parts:
  compare  ours and sentence-transformers on --queries x --passages; the overlap of the negatives
           both chose for the same record
  scale    ours at each --scale corpus size with --scale-queries queries: how peak memory grows
           with the corpus (it should grow only with the stored embeddings, N x 384 x 4 bytes)

Run:
    python tools/bench_mine.py --out docs/bench/mine-$(date +%Y%m%d).json
    python tools/bench_mine.py --quick                 # smoke test: 2k passages, 200 queries
Markdown tables go to stdout, raw results (versions, CPU, load average) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import FIXED_MMAP_THRESHOLD, machine, reset_peak_kib, run_worker, status_kib  # noqa: E402

PERC_POS, WINDOW, NUM_NEGATIVES = 0.95, 10, 4


# --- memory -------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of this process so far: less sensitive than wall time to other
    processes competing for the cores."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- data ---------------------------------------------------------------------------------------


def load_data(queries: int, passages: int) -> tuple[list[dict], list[str], str]:
    """(query/positive records, corpus texts, where from)."""
    from train import assets
    from train.errors import UserError

    try:
        path = assets.path("gcide") / "pairs.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        records = [{"query": r["query"], "positive": r["positive"]} for r in rows]
        pool = [r["positive"] for r in rows]
        origin = f"gcide ({path})"
    except (UserError, KeyError, OSError) as e:
        print(f"gcide unavailable ({e}); using SNLI", file=sys.stderr)
        snli = assets.path("snli")
        rows = [json.loads(line) for line in (snli / "train_pairs.jsonl").read_text().splitlines()]
        records = [{"query": r["anchor"], "positive": r["positive"]} for r in rows]
        pool = [r["positive"] for r in rows] + [json.loads(line)["text"] for line in
                                                 (snli / "train_sentences.jsonl").read_text().splitlines()]
        origin = f"snli ({snli})"
    records = records[:queries]
    corpus = list(dict.fromkeys(pool))[:passages]
    if len(corpus) < passages:
        raise SystemExit(f"only {len(corpus):,} distinct passages in {origin}, asked for {passages:,}")
    missing = {r["positive"] for r in records} - set(corpus)
    assert not missing, f"{len(missing)} positives outside the corpus"
    return records, corpus, origin


def write_inputs(folder: Path, records: list[dict], corpus: list[str]) -> tuple[str, str]:
    pairs, docs = folder / f"pairs-{len(records)}.jsonl", folder / f"corpus-{len(corpus)}.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    docs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(corpus)))
    return str(pairs), str(docs)


# --- workers: each in a fresh process ------------------------------------------------------------


def import_transformers() -> None:
    """Import what loading the model imports before the baseline is taken, in both workers alike
    (sentence-transformers imports it at import time, our loader only when it loads)."""
    from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401


def worker_ours(job: dict) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from train import config
    from train.run import run

    torch.set_num_threads(job["threads"])
    config.register()
    with initialize_config_dir(config_dir=str(config.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "recipe=mine_hard_negatives", f"data.path={job['pairs']}", f"mine.corpus={job['corpus']}",
            f"model.max_length={job['max_length']}", f"mine.batch_size={job['batch_size']}",
            f"mine.perc_pos={PERC_POS}", f"mine.window={WINDOW}", f"mine.num_negatives={NUM_NEGATIVES}",
            "mine.skip=0", "mine.sample=false", "trainer.device=cpu"])
    out_dir = Path(job["tmp"]) / "run"
    out_dir.mkdir(parents=True, exist_ok=True)
    import_transformers()
    base = reset_peak_kib()
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = run(cfg, out_dir)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = status_kib("VmHWM")
    summary = result["summary"]
    mined = [json.loads(line) for line in (out_dir / "mined.jsonl").read_text().splitlines()]
    return {"impl": "ours", "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 1024, "rise_mib": (peak - base) / 1024,
            "baseline_rss_mib": base / 1024, "stages_s": summary["seconds"], "written": summary["counts"]["written"],
            "records": summary["counts"]["records"], "corpus": summary["counts"]["corpus"],
            "removed": summary["removed"], "kept_mean": summary["scores"]["kept"]["mean"],
            "chosen": [[r["query"], r["negatives"]] for r in mined]}


def worker_st(job: dict) -> dict:
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    torch.set_num_threads(job["threads"])
    records = [json.loads(line) for line in Path(job["pairs"]).read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in Path(job["corpus"]).read_text().splitlines()]
    import_transformers()
    base = reset_peak_kib()
    t0, c0 = time.perf_counter(), cpu_seconds()
    model = SentenceTransformer(job["model"], device="cpu")
    model.max_seq_length = job["max_length"]
    ds = datasets.Dataset.from_list([{"anchor": r["query"], "positive": r["positive"]} for r in records])
    kwargs = {"faiss_batch_size": job["st_chunk"]} if job.get("st_chunk") else {}
    out = mine_hard_negatives(ds, model, corpus=corpus, range_min=0, range_max=WINDOW,
                              relative_margin=1 - PERC_POS, num_negatives=NUM_NEGATIVES, sampling_strategy="top",
                              output_format="n-tuple", batch_size=job["batch_size"], use_faiss=False,
                              verbose=True, **kwargs)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = status_kib("VmHWM")
    cols = [f"negative_{i + 1}" for i in range(NUM_NEGATIVES)]
    chosen = [[row["anchor"], [row[c] for c in cols]] for row in out]
    return {"impl": "sentence-transformers", "faiss_batch_size": job.get("st_chunk") or 16384, "wall_s": wall,
            "cpu_s": cpu,
            "peak_rss_mib": peak / 1024, "rise_mib": (peak - base) / 1024, "baseline_rss_mib": base / 1024,
            "written": len(out), "records": len(records), "corpus": len(corpus), "chosen": chosen}


WORKERS = {"ours": worker_ours, "st": worker_st}


def spawn(job: dict) -> dict:
    env = {**FIXED_MMAP_THRESHOLD, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    load = os.getloadavg()
    t0 = time.perf_counter()
    out, tail, code = run_worker(__file__, job, env)
    if out is None:
        print(f"  worker {job['kind']} failed (exit {code}):\n    " + "\n    ".join(tail), file=sys.stderr)
        return {"error": "\n".join(tail), "kind": job["kind"]}
    out.update({"process_s": time.perf_counter() - t0, "load_average_start": load,
                "load_average_end": os.getloadavg(), "queries_in": job["queries"], "passages_in": job["passages"]})
    return out


# --- parts --------------------------------------------------------------------------------------


def overlap(a: dict, b: dict) -> dict:
    """Share of the negatives both chose, over records both wrote (matched by query, in order)."""
    mine: dict[str, list] = {}
    for q, negs in a["chosen"]:
        mine.setdefault(q, []).append(set(negs))
    same = total = 0
    for q, negs in b["chosen"]:
        if mine.get(q):
            ours = mine[q].pop(0)
            same += len(ours & set(negs))
            total += len(negs)
    return {"records_compared": total // NUM_NEGATIVES, "same_negatives": same / max(1, total)}


def part_compare(args, folder: Path, base_job: dict) -> dict:
    records, corpus, origin = load_data(args.queries, args.passages)
    pairs, docs = write_inputs(folder, records, corpus)
    job = {**base_job, "pairs": pairs, "corpus": docs, "queries": len(records), "passages": len(corpus)}
    runs = [spawn({**job, "kind": "ours"})]
    print(f"  ours: {fmt_run(runs[-1])}", file=sys.stderr)
    if not args.skip_st:
        for chunk in [None] + ([args.st_chunk] if args.st_chunk else []):
            runs.append(spawn({**job, "kind": "st", "st_chunk": chunk}))
            print(f"  sentence-transformers: {fmt_run(runs[-1])}", file=sys.stderr)
    ok = [r for r in runs if "error" not in r]
    ours = next((r for r in ok if r["impl"] == "ours"), None)
    for r in ok:
        if ours and r is not ours:
            r["overlap_with_ours"] = overlap(ours, r)
    for r in ok:
        r.pop("chosen", None)
    return {"data": origin, "queries": len(records), "unique_queries": len({r["query"] for r in records}),
            "passages": len(corpus), "runs": runs}


def part_scale(args, folder: Path, base_job: dict) -> list[dict]:
    records, corpus, origin = load_data(args.scale_queries, max(args.scale))
    out = []
    for n in args.scale:
        pairs, docs = write_inputs(folder, records, corpus[:n])
        r = spawn({**base_job, "kind": "ours", "pairs": pairs, "corpus": docs, "queries": len(records),
                   "passages": n})
        r.pop("chosen", None)
        r["embeddings_mib"] = n * 384 * 4 / 2**20
        out.append(r)
        print(f"  ours at {n:,} passages: {fmt_run(r)}", file=sys.stderr)
    return out


def fmt_run(r: dict) -> str:
    if "error" in r:
        return "failed"
    return f"{r['wall_s']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['rise_mib']:.0f} MiB)"


def tables(report: dict) -> str:
    lines = []
    c = report.get("compare")
    if c:
        lines += [f"\n{c['queries']:,} queries ({c['unique_queries']:,} distinct) x {c['passages']:,} passages "
                  f"({c['data']}), MiniLM, max_length {report['settings']['max_length']}, CPU",
                  "", "| implementation | wall time | CPU time | peak RSS | rise over baseline | records written | "
                  "negatives also chosen by ours |", "|---|---|---|---|---|---|---|"]
        for r in c["runs"]:
            if "error" in r:
                lines.append(f"| {r.get('kind')} | failed | | | | | |")
                continue
            name = "ours (`recipe=mine_hard_negatives`)" if r["impl"] == "ours" else \
                f"sentence-transformers `mine_hard_negatives` (faiss_batch_size {r['faiss_batch_size']})"
            same = f"{r['overlap_with_ours']['same_negatives']:.1%}" if "overlap_with_ours" in r else "-"
            cpu = f"{r['cpu_s']:.0f} s" if "cpu_s" in r else "-"
            lines.append(f"| {name} | {r['wall_s']:.0f} s | {cpu} | {r['peak_rss_mib']:,.0f} MiB | "
                         f"{r['rise_mib']:,.0f} MiB | {r['written']:,} of {r['records']:,} | {same} |")
    s = report.get("scale")
    if s:
        lines += ["", "| passages | queries | embeddings (N x 384 x 4 B) | peak RSS | rise over baseline | "
                  "wall time |", "|---|---|---|---|---|---|"]
        for r in s:
            if "error" in r:
                continue
            lines.append(f"| {r['passages_in']:,} | {r['queries_in']:,} | {r['embeddings_mib']:.0f} MiB | "
                         f"{r['peak_rss_mib']:,.0f} MiB | {r['rise_mib']:,.0f} MiB | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--passages", type=int, default=100000)
    ap.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",")], default=[12500, 25000, 50000, 100000])
    ap.add_argument("--scale-queries", type=int, default=1000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--st-chunk", type=int, help="also run sentence-transformers with this faiss_batch_size")
    ap.add_argument("--skip-st", action="store_true")
    ap.add_argument("--parts", default="compare,scale")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2,000 passages, 200 queries")
    ap.add_argument("--out", help="JSON file for the raw results")
    ap.add_argument("--tables", metavar="JSON", help="print the tables of an earlier run's raw results and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.passages, args.scale, args.scale_queries = 200, 2000, [500, 1000, 2000], 100
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        Path(job["result"]).write_text(json.dumps(WORKERS[job["kind"]](job)))
        return
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return
    from train import assets

    out = args.out or os.path.join(tempfile.gettempdir(), f"bench_mine-{time.strftime('%Y%m%d-%H%M%S')}.json")
    base_job = {"model": str(assets.path("minilm")), "max_length": args.max_length, "batch_size": args.batch_size,
                "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))}
    report = {"machine": machine(), "settings": {
        "perc_pos": PERC_POS, "window": WINDOW, "num_negatives": NUM_NEGATIVES, "max_length": args.max_length,
        "batch_size": args.batch_size, "worker_env": FIXED_MMAP_THRESHOLD, "argv": sys.argv[1:]}}
    with tempfile.TemporaryDirectory() as tmp:
        if "compare" in args.parts:
            report["compare"] = part_compare(args, Path(tmp), base_job)
        if "scale" in args.parts:
            report["scale"] = part_scale(args, Path(tmp), base_job)
    report["machine"]["load_average_end"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(tables(report))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
