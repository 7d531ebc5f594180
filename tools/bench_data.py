"""The data path at scale: conversion, start-up, memory and time per step against the corpus size.

    python tools/bench_data.py --pairs 1000000 10000000 --dir /tmp/bench_data [--batch 32768] [--steps 3]

For each size it writes a synthetic JSONL corpus of (query, positive) pairs (10 and 20 words from
a fixed vocabulary, seeded; past 1M pairs, blocks of the first 1M with their digits permuted:
write_corpus) into --dir if it is not there, then measures, each in a fresh process
so that peak RSS is that process's own:
  convert    one-off conversion into the Arrow cache (read + validate + write), seconds, peak RSS
  assemble   (instead of convert, past 1M pairs) the cache built from the 1M cache, digits permuted as
             write_corpus does, checked against the corpus's lines: for the read path at 50M pairs
             where conversion would take hours (`assemble`)
  start      a cached start: process start -> sources read -> first global batch collated
             (seconds from the interpreter's start, imports included), peak RSS
  step       data time per step at --batch (draw the global batch, read, tokenize, collate; 1 rank, in line)
  texts/s    read + tokenize + collate alone with 0, 1 and 2 prefetch threads (2 texts per pair):
             --texts-batches batches of --texts-batch pairs, timed from the prefetcher's start
  memory     peak RSS, and at the end private (RssAnon) and file-backed (RssFile) resident memory
Tokenizer: the shipped MiniLM's (through the tiny BERT, whose tokenizer it is). Keep --dir outside
the repo; delete the corpora when done (a 10M-pair corpus is about 1.9 GB, its cache as much).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


BLOCK_PAIRS = 1_000_000  # pairs drawn from the generator; larger corpora repeat them with their digits permuted


def write_corpus(path: Path, pairs: int) -> None:
    """The first 1M pairs drawn (seeded); each further block of 1M is the first with its digits
    permuted by a seeded permutation of 0-9 per block: the same lengths and word shapes, other
    words (w123 -> w807), so no pair repeats, and a 50M-pair corpus takes minutes, not an hour."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = np.array([f"w{i}" for i in range(30_000)])
    lines = []
    for start in range(0, min(pairs, BLOCK_PAIRS), 100_000):
        n = min(100_000, min(pairs, BLOCK_PAIRS) - start)
        words = vocab[rng.integers(0, len(vocab), size=(n, 30))]
        lines.append("".join(json.dumps({"query": " ".join(w[:10]), "positive": " ".join(w[10:])}) + "\n"
                             for w in words.tolist()))
    block = "".join(lines).encode()
    ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n")) + 1  # [pairs in block]
    digits = b"0123456789"
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(block)
        for k, start in enumerate(range(BLOCK_PAIRS, pairs, BLOCK_PAIRS), start=1):
            order = bytes(digits[i] for i in np.random.default_rng(k).permutation(10))
            n = min(BLOCK_PAIRS, pairs - start)
            f.write(block[: ends[n - 1]].translate(bytes.maketrans(digits, order)))
    tmp.replace(path)


def assemble(corpus: Path, cache: Path, base_corpus: Path, base_cache: Path) -> dict:
    """The Arrow cache of a corpus past 1M pairs built from the 1M corpus's cache, as write_corpus
    built the corpus (each block of 1M: the first with its digits permuted), instead of converting it:
    conversion runs at ~10k pairs/s on the shared 2-core machine (hours at 50M), and what `start`
    and `step` measure is the read path over the finished cache. Through arrow_store.cached with the
    corpus's own fingerprint (the cache read_source then finds), in two parts of 8,192-row record
    batches as --num-proc 2 writes them; 2,000 random rows checked against the corpus's own lines."""
    import numpy as np
    import pyarrow as pa

    from train import arrow_store
    from train.data import read_source

    base = read_source("base", str(base_corpus), cache_dir=str(base_cache))
    columns = {"anchor": base.anchors.array, "positive": base.positives.array}
    pairs = sum(1 for _ in open(corpus, "rb"))
    assert pairs % BLOCK_PAIRS == 0 and len(base) == BLOCK_PAIRS, (pairs, len(base))
    digits = b"0123456789"
    tables = [bytes.maketrans(digits, bytes(digits[i] for i in np.random.default_rng(k).permutation(10)))
              if k else None for k in range(pairs // BLOCK_PAIRS)]

    def permuted(chunk: pa.StringArray, table: bytes | None) -> pa.StringArray:
        if table is None:
            return chunk
        _, offsets, data = chunk.buffers()  # digits -> digits: the offsets stay valid
        return pa.StringArray.from_buffers(len(chunk), offsets, pa.py_buffer(data.to_pybytes().translate(table)),
                                           null_count=0, offset=chunk.offset)

    def build(folder: Path) -> None:
        schema = pa.schema([("anchor", pa.string()), ("positive", pa.string())])
        writers = [pa.ipc.new_file(str(folder / f"part-{i:05d}.arrow"), schema) for i in range(2)]
        written = 0
        for table in tables:
            for c in range(columns["anchor"].num_chunks):
                batch = pa.record_batch([permuted(columns[k].chunk(c), table) for k in schema.names], schema=schema)
                writers[0 if written < pairs // 2 else 1].write_batch(batch)
                written += batch.num_rows
        for w in writers:
            w.close()

    t = time.perf_counter()
    options = {"fields": {}, "num_negatives": None, "limit": None}  # read_source's for a plain pairs file
    arrow_store.cached(corpus, options, build, str(cache))
    seconds = time.perf_counter() - t
    # Check: rows of the assembled cache equal the corpus's lines, read from the file itself.
    source = read_source("bench", str(corpus), cache_dir=str(cache))
    assert len(source) == pairs
    base_bytes = base_corpus.stat().st_size
    starts = np.concatenate([[0], np.flatnonzero(np.frombuffer(base_corpus.read_bytes(), np.uint8) == 10) + 1])
    rows = np.random.default_rng(1).choice(pairs, 2000, replace=False)
    anchors, positives = source.anchors.take(rows), source.positives.take(rows)
    with open(corpus, "rb") as f:
        for r, a, p in zip(rows.tolist(), anchors, positives):
            k, i = divmod(r, BLOCK_PAIRS)
            f.seek(k * base_bytes + int(starts[i]))
            line = json.loads(f.readline())
            assert (line["query"], line["positive"]) == (a, p), (r, line, a, p)
    return {"assemble_s": seconds, "rows": pairs, "checked_rows": len(rows)}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> dict:
    """Now: private (anonymous) memory and file-backed pages (the memory-mapped Arrow parts among them:
    page cache, shared by the ranks of a node, dropped under pressure), in MiB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def measure(args) -> dict:
    """One phase in this process; prints a JSON line."""
    from train import assets
    from train.data import Mixture, read_source
    from train.model import load_encoder
    from train.prefetch import Prefetcher

    out: dict = {}
    t = time.perf_counter()
    source = read_source("bench", args.corpus, cache_dir=args.cache, num_proc=args.num_proc)
    out["read_s"] = time.perf_counter() - t
    if args.phase == "assemble":
        return assemble(Path(args.corpus), Path(args.cache), Path(args.dir) / f"pairs_{BLOCK_PAIRS}.jsonl",
                        Path(args.dir) / f"cache_{BLOCK_PAIRS}")
    if args.phase == "convert":
        return {**out, "peak_rss_mb": peak_mb(), "rows": len(source), **resident_mb()}
    encoder = load_encoder(str(assets.path("tiny-bert")), pooling="mean", max_length=32)
    if args.phase == "texts":
        # Throughput: K batches counted from the prefetcher's start, so that the batches the threads
        # prepare ahead are not counted as free (up to 2 x workers more than K are in flight at the end).
        mixture = Mixture(sizes=[len(source)], weights=[None], homogeneous=[False], batch_size=args.texts_batch,
                          seed=0)
        t = time.perf_counter()
        with Prefetcher(mixture, [source], encoder, 0, 1, args.workers[0]) as data:
            for _ in range(args.texts_batches):
                data.next()
            seconds = time.perf_counter() - t
        return {**out, "texts_per_s": 2 * args.texts_batch * args.texts_batches / seconds, "peak_rss_mb": peak_mb(),
                **resident_mb(), "load_average": os.getloadavg()}
    mixture = Mixture(sizes=[len(source)], weights=[None], homogeneous=[False], batch_size=args.batch, seed=0)
    with Prefetcher(mixture, [source], encoder, 0, 1, 0) as data:
        t = time.perf_counter()
        data.next()
        out["first_batch_s"] = time.perf_counter() - t
        out["start_to_first_batch_s"] = time.perf_counter() - T_START
        t = time.perf_counter()
        for _ in range(args.steps):
            data.next()
        per_step = (time.perf_counter() - t) / args.steps
    out.update(data_s_per_step=per_step, peak_rss_mb=peak_mb(), **resident_mb(), load_average=os.getloadavg())
    return out


def run_phase(corpus: Path, cache: Path, phase: str, args, workers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--measure", phase, "--corpus", str(corpus), "--cache", str(cache),
           "--batch", str(args.batch), "--steps", str(args.steps), "--workers", str(workers),
           "--num-proc", str(args.num_proc), "--texts-batch", str(args.texts_batch),
           "--texts-batches", str(args.texts_batches), "--dir", str(args.dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--dir", default="/tmp/bench_data")
    p.add_argument("--batch", type=int, default=32_768)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--texts-batch", type=int, default=4096, help="pairs per batch of the texts/s measure")
    p.add_argument("--texts-batches", type=int, default=16, help="batches of the texts/s measure")
    p.add_argument("--phases", default="convert,start,texts")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        args.phase = args.measure
        print(json.dumps(measure(args)))
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    for pairs in args.pairs:
        corpus = root / f"pairs_{pairs}.jsonl"
        if not corpus.exists():
            t = time.perf_counter()
            write_corpus(corpus, pairs)
            print(f"wrote {corpus} ({corpus.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
        cache = root / f"cache_{pairs}"
        row: dict = {"pairs": pairs}
        phases = args.phases.split(",")
        if "assemble" in phases and pairs > BLOCK_PAIRS:  # the 1M cache comes first (--pairs 1000000 ...)
            row["assemble"] = run_phase(corpus, cache, "assemble", args)
        elif "convert" in phases or "assemble" in phases:
            row["convert"] = run_phase(corpus, cache, "convert", args)
        if "start" in phases:
            row["start"] = run_phase(corpus, cache, "start", args)
        if "texts" in args.phases:
            row["texts"] = {w: run_phase(corpus, cache, "texts", args, w) for w in args.workers}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
