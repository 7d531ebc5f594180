"""The data path at scale: conversion, start-up, memory and time per step against the corpus size.

    python tools/bench_data.py --pairs 1000000 10000000 --dir /tmp/bench_data [--batch 32768] [--steps 3]

For each size it writes a synthetic JSONL corpus of (query, positive) pairs (10 and 20 words from
a fixed vocabulary, seeded; past 1M pairs, blocks of the first 1M with their digits permuted:
write_corpus) into --dir if it is not there, then measures, each in a fresh process
so that peak RSS is that process's own:
  convert    one-off conversion into the Arrow cache (read + validate + write), seconds, peak RSS
  start      a cached start: process start -> sources read -> first global batch collated
             (seconds from the interpreter's start, imports included), peak RSS
  step       data time per step at --batch (draw the global batch, read, tokenize, collate; 1 rank, in line)
  read       (--phases read) the read alone: --steps + 1 global batches drawn and both columns read,
             no tokenization; wall, CPU and system seconds and page faults per batch (the code
             measured is the `train` package on PYTHONPATH: set it to compare two versions)
  steps      (--phases steps) the whole step (draw, read, tokenize, collate; in line) of every --pairs
             size in one process, one step of each size in turn for --steps rounds: the sizes'
             steps share the machine's load, so their ratio holds where the load moves the seconds
  texts/s    read + tokenize + collate alone with 0, 1 and 2 prefetch threads (2 texts per pair):
             --texts-batches batches of --texts-batch pairs, timed from the prefetcher's start
  memory     peak RSS, and at the end private (RssAnon) and file-backed (RssFile) resident memory
--cold drops the caches' pages from the page cache before each measure (fsync + POSIX_FADV_DONTNEED);
to compare the read of two versions, set PYTHONPATH to each one's checkout in turn.
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


def drop_pages(folders: list[Path]) -> None:
    """--cold: every file under `folders` out of the page cache (fsync, then posix_fadvise DONTNEED: the
    kernel drops a file's clean pages), so that the measure reads the corpus from disk."""
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> dict:
    """Now: private (anonymous) memory and file-backed pages (the memory-mapped Arrow parts among them:
    page cache, shared by the ranks of a node, dropped under pressure), in MiB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def interleaved_steps(args) -> dict:
    """Seconds of each whole step, per corpus, the corpora's steps taken in turn (phase "steps")."""
    from train import assets
    from train.data import Mixture, read_source
    from train.model import load_encoder
    from train.prefetch import Prefetcher

    encoder = load_encoder(str(assets.path("tiny-bert")), pooling="mean", max_length=32)
    sources = [read_source("bench", corpus, cache_dir=cache) for corpus, cache in zip(args.corpora, args.caches)]
    loaders = [Prefetcher(Mixture(sizes=[len(s)], weights=[None], homogeneous=[False], batch_size=args.batch, seed=0),
                          [s], encoder, 0, 1, 0) for s in sources]
    seconds: list[list[float]] = [[] for _ in sources]
    for _ in range(args.steps + 1):  # the first round warms up (the tokenizer, the first pages)
        for k, data in enumerate(loaders):
            t = time.perf_counter()
            data.next()
            seconds[k].append(time.perf_counter() - t)
    return {"rows": [len(s) for s in sources], "step_s": seconds, "peak_rss_mb": peak_mb(),
            "load_average": os.getloadavg()}


def measure(args) -> dict:
    """One phase in this process; prints a JSON line."""
    if args.phase == "steps":
        return interleaved_steps(args)
    from train import assets
    from train.data import Mixture, read_source
    from train.model import load_encoder
    from train.prefetch import Prefetcher

    out: dict = {}
    t = time.perf_counter()
    source = read_source("bench", args.corpus, cache_dir=args.cache, num_proc=args.num_proc)
    out["read_s"] = time.perf_counter() - t
    if args.phase == "convert":
        return {**out, "peak_rss_mb": peak_mb(), "rows": len(source), **resident_mb()}
    if args.phase == "read":
        # The read alone: both columns of a global batch through Column.take, no tokenization;
        # wall and CPU seconds, major and minor page faults per batch.
        mixture = Mixture(sizes=[len(source)], weights=[None], homogeneous=[False], batch_size=args.batch, seed=0)
        per_batch = []
        for _ in range(args.steps + 1):
            t, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            rows = [r for _, r in mixture.next_batch()]
            source.anchors.take(rows), source.positives.take(rows)
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            per_batch.append({"wall_s": time.perf_counter() - t,
                              "cpu_s": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                              "sys_s": c1.ru_stime - c0.ru_stime,  # the kernel's share: page faults, madvise
                              "major_faults": c1.ru_majflt - c0.ru_majflt, "minor_faults": c1.ru_minflt - c0.ru_minflt})
        return {**out, "per_batch": per_batch, "peak_rss_mb": peak_mb(), **resident_mb(),
                "load_average": os.getloadavg()}
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
           "--texts-batches", str(args.texts_batches)]
    return run_measure(cmd)


def run_measure(cmd: list[str]) -> dict:
    """The JSON line of a measure run in a fresh process (its peak RSS its own)."""
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
    p.add_argument("--cold", action="store_true",
                   help="drop the Arrow caches from the page cache before each measure (not the conversion): "
                        "the corpus is read from disk, as where the page cache cannot hold it")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--corpora", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--caches", nargs="+", help=argparse.SUPPRESS)
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
        for phase in ("convert", "start", "read"):
            if phase in args.phases:
                if args.cold and phase != "convert":
                    drop_pages([cache])
                row[phase] = run_phase(corpus, cache, phase, args)
        if "texts" in args.phases:
            row["texts"] = {}
            for w in args.workers:
                if args.cold:
                    drop_pages([cache])
                row["texts"][w] = run_phase(corpus, cache, "texts", args, w)
        print(json.dumps(row), flush=True)
    if "steps" in args.phases.split(","):
        corpora = [root / f"pairs_{pairs}.jsonl" for pairs in args.pairs]
        cmd = [sys.executable, __file__, "--measure", "steps", "--corpora", *map(str, corpora), "--caches",
               *(str(root / f"cache_{pairs}") for pairs in args.pairs), "--batch", str(args.batch), "--steps",
               str(args.steps)]
        if args.cold:
            drop_pages([root / f"cache_{pairs}" for pairs in args.pairs])
        print(json.dumps({"pairs": args.pairs, "steps": run_measure(cmd)}), flush=True)


if __name__ == "__main__":
    main()
