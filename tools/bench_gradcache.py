"""Benchmark of the gradient-cached contrastive step (train/gradcache.py) on a real model and real data.

Setup shared by every part: all-MiniLM-L6-v2 (asset "minilm", truncated to --max-length tokens) trained
on SNLI (premise, entailment, contradiction) triples (asset "snli"): one hard negative per example, so
3 texts per example. Dropout is on (encoder.train()), float32, AdamW (lr 2e-5, weight decay 0.01) with
gradient clipping at 1.0, and query -> passage InfoNCE at temperature 0.05 (symmetric=False), as the
trainer's defaults. A "step" is one optimizer step: contrastive_step(...) + engine.step(), with duplicate
texts masked in parts a and b (the trainer's default) and not in part c. Every configuration runs one
warm-up step, then --steps timed steps, each on a different batch (rows k*B .. (k+1)*B of the triples);
times are medians.

Parts (--parts a,b,c,m):
  a  Batch sweep at a fixed chunk (--chunk examples per forward): seconds per example of a step and the
     step's peak memory, one fresh process per batch size.
  b  Cached vs uncached at one batch (--compare-batch): cached with length-grouped chunks, cached without
     grouping, uncached (chunk = batch: one forward with grad), and cached with packed forwards
     (train/packing.py). Reports the time ratio and, for both cached variants, the "floor"
     1 + t(no-grad forward) / t(forward+backward), both measured on the step's own chunks in the same
     process: the least a cached step can cost relative to an uncached step on the same chunks. Also
     padded and real tokens per text of each variant.
  c  Side by side, in one process, with sentence-transformers' CachedMultipleNegativesRankingLoss
     (scale 20 = 1 / temperature 0.05) on the same batches, model, length and optimizer; our loss with
     symmetric=False, temperature 0.05, mask_duplicates=False to match. Ours: padded length-grouped
     chunks of --chunk examples, packed with the same chunk, packed cut by each of --budgets tokens.
     ST: mini_batch_size = chunk x texts per example (our chunk counts examples, ST's texts: forwards
     of the same size), and mini_batch_num_tokens at each budget. --data snli (triples, short) or wiki
     (title, paragraph pairs: a heavy-tailed passage length). The variants' steps are interleaved, round
     by round, so that background load hits them alike; medians over the rounds.
  m  Peak memory under one token budget (--chunk-tokens) on SNLI and on Wikipedia paragraphs, padded
     and packed, each in a fresh process.

Memory (parts a, b, m): on CPU, the peak RSS increase of the process over the steps: once the model and
data are loaded, the kernel's high-water mark is reset (/proc/self/clear_refs) and VmRSS read as the
baseline; after the steps, VmHWM - baseline. It includes AdamW's two moments (allocated at the first
step, reported separately as adam_state_mib). On CUDA: max_memory_allocated - memory_allocated. Part c
runs all variants in one process, so it reports the largest forward's tokens instead.

Run:
    python tools/bench_gradcache.py --out docs/bench_gradcache.json
    python tools/bench_gradcache.py --quick                          # smoke test, about a minute
    python tools/bench_gradcache.py --parts c --batches 64 --chunk 16 --steps 2

Markdown tables go to stdout, raw results (with versions, CPU/GPU, thread count, load average) to --out.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import FIXED_MMAP_THRESHOLD, machine, reset_peak_kib, run_worker, status_kib

from train import assets, packing
from train.data import collate, read_source
from train.dist import World
from train.engines import TorchEngine
from train.gradcache import chunk_inputs, contrastive_step, make_pairing
from train.losses import contrastive_loss
from train.model import freeze_unused, load_encoder, pad
from train.optim import param_groups

TEMPERATURE = 0.05
LR = 2e-5
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
DEFAULT_BATCHES = [64, 128, 256, 512, 1024, 2048, 4096]
QUICK = {"batches": [16, 32], "chunk": 8, "steps": 1}
TEXTS_PER_EXAMPLE = 3  # SNLI triples: query, positive, one hard negative
LOSS = functools.partial(contrastive_loss, temperature=TEMPERATURE, symmetric=False)


# --- shared pieces ------------------------------------------------------------------------------


def device() -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn, *args):
    """(seconds, result) of fn(*args), waiting for the GPU on both ends so that its queue is included."""
    synchronize(dev)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(dev)
    return time.perf_counter() - t0, out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def build_engine(max_length: int, dev: torch.device) -> TorchEngine:
    """Our encoder and single-process engine, as the trainer builds them with its default optimizer."""
    encoder = load_encoder(str(assets.path("minilm")), max_length=max_length)
    freeze_unused(encoder)  # BERT's pooler head never gets a gradient; the trainer freezes it too
    encoder.train()  # dropout on: it is part of the cost and the RNG replay's reason to exist
    return TorchEngine(encoder, World(device=dev),
                       lambda m: torch.optim.AdamW(param_groups(m, WEIGHT_DECAY), lr=LR),
                       lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                       MAX_GRAD_NORM, bf16=False)


def load_triples(n: int):
    """At least the first n SNLI triples (the file holds about 33k; rows wrap around past its end)."""
    source = read_source("snli", str(assets.path("snli") / "train_triples.jsonl"), limit=n)
    assert 2 + source.num_negatives == TEXTS_PER_EXAMPLE, source.num_negatives
    return source


def rows(k: int, batch: int, n: int) -> list[int]:
    """Rows of the k-th batch (0 is the warm-up): consecutive, so every step sees new texts."""
    return [(k * batch + i) % n for i in range(batch)]


def batches(source, tokenize, batch: int, count: int) -> list:
    """`count` collated batches of `batch` examples, tokenized ahead of the clock (the loader's job)."""
    return [collate([source], [(0, r) for r in rows(k, batch, len(source.anchors))], tokenize)
            for k in range(count)]


def adam_state_mib(engine: TorchEngine) -> float:
    """AdamW's two float32 moments per trainable parameter: allocated by the first step."""
    n = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    return 2 * 4 * n / 2**20


class PeakMemory:
    """Peak memory of a stretch of code, relative to what the process held when reset() ran."""

    def __init__(self, dev: torch.device):
        self.dev, self.base = dev, 0

    def reset(self) -> None:
        if self.dev.type == "cuda":
            gc.collect()
            torch.cuda.reset_peak_memory_stats(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
            return
        self.base = reset_peak_kib()

    def peak_mib(self) -> float:
        if self.dev.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.dev) - self.base) / 2**20
        return (status_kib("VmHWM") - self.base) / 1024


def length_grouped_chunks(engine: TorchEngine, batch, chunk: int, packed: bool = False,
                          chunk_tokens: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The chunks' model inputs contrastive_step forms for this batch (same plan, same padding or packing)."""
    rows = packing.row_tokens(engine.encoder.spec.max_length, chunk_tokens) if packed else None
    return chunk_inputs(batch.query_ids + batch.passage_ids, chunk * (1 + batch.group), engine.encoder,
                        chunk_tokens=chunk_tokens, packed=packed, row_tokens=rows)[1]


def tokens_per_text(stats: list) -> tuple[float, float]:
    """(padded, real) tokens per text over several steps' StepStats."""
    texts = sum(s.texts for s in stats)
    return sum(s.padded_tokens for s in stats) / texts, sum(s.real_tokens for s in stats) / texts


# --- workers: each runs in a fresh process, so that peak memory starts from a clean slate -------


def worker_step(job: dict) -> dict:
    """Parts a and b: our step at one (batch, chunk, grouping); the floor measurement when asked."""
    dev = device()
    torch.manual_seed(0)
    engine = build_engine(job["max_length"], dev)
    b, chunk, steps = job["batch"], job["chunk"], job["steps"]
    data = batches(load_pairs(job.get("data", "snli"), (steps + 1) * b), engine.encoder.tokenize, b, steps + 1)
    packed, chunk_tokens = job.get("packed", False), job.get("chunk_tokens")

    def step(batch):
        stats = contrastive_step(engine, batch, LOSS, chunk, group_by_length=job["group_by_length"],
                                 mask_duplicates=True,  # the trainer's default
                                 packed=packed, chunk_tokens=chunk_tokens,
                                 row_tokens=packing.row_tokens(job["max_length"], chunk_tokens) if packed else None)
        engine.step()
        return stats

    memory = PeakMemory(dev)
    memory.reset()
    times, stats = [], []
    for k, batch in enumerate(data):
        t, s = timed(dev, step, batch)
        if k:  # k == 0 is the warm-up
            times.append(t)
            stats.append(s)
    peak = memory.peak_mib()
    padded, real = tokens_per_text(stats)
    # What sets a chunk's activation memory: the padded width of the first (longest) chunk, over
    # every step run here, the warm-up included since the peak covers it.
    widest = max(max(len(s) for s in batch.query_ids + batch.passage_ids) for batch in data)
    out = {
        "batch": b, "chunk": chunk, "group_by_length": job["group_by_length"], "chunks": stats[0].chunks,
        "texts_per_step": stats[0].texts, "step_s": times, "median_step_s": median(times),
        "s_per_example": median(times) / b, "examples_per_s": b / median(times),
        "padded_tokens_per_text": padded, "real_tokens_per_text": real,
        "peak_mib": peak, "adam_state_mib": adam_state_mib(engine), "loss": [s.loss for s in stats],
        "threads": torch.get_num_threads(), "widest_chunk_tokens": widest,
        "largest_chunk_tokens": max(s.largest_chunk for s in stats), "packed": packed, "chunk_tokens": chunk_tokens,
        "data": job.get("data", "snli"),
    }
    if job.get("floor"):
        out["floor"] = measure_floor(engine, data[1:], chunk, dev, packed, chunk_tokens)
    return out


def measure_floor(engine: TorchEngine, data: list, chunk: int, dev: torch.device, packed: bool = False,
                  chunk_tokens: int | None = None) -> dict:
    """A cached step runs a no-grad forward and a forward+backward of every chunk; an uncached step
    on the same chunks would run only the latter. Both timed here on the cached step's chunks, the
    loss left out (a dummy emb.sum()), so 1 + t_nograd / t_fwd_bwd is the cached step's least cost
    relative to an uncached one."""
    def no_grad_pass(chunks):
        with torch.no_grad():
            for x in chunks:
                engine.forward(*x)

    def grad_pass(chunks):
        for x in chunks:
            engine.forward(*x).sum().backward()

    nograd, fwd_bwd = [], []
    for batch in data:
        chunks = length_grouped_chunks(engine, batch, chunk, packed, chunk_tokens)
        nograd.append(timed(dev, no_grad_pass, chunks)[0])
        fwd_bwd.append(timed(dev, grad_pass, chunks)[0])
        engine.optimizer.zero_grad(set_to_none=True)
    t_n, t_fb = median(nograd), median(fwd_bwd)
    return {"nograd_forward_s": nograd, "forward_backward_s": fwd_bwd, "median_nograd_forward_s": t_n,
            "median_forward_backward_s": t_fb, "floor": 1 + t_n / t_fb}


def st_tokens(features: list[dict], mini_batch_size: int, num_tokens: int | None = None) -> tuple[int, int, int]:
    """(padded, real, largest mini-batch's padded) tokens of CachedMultipleNegativesRankingLoss's forwards.

    As sentence-transformers 6.2 does it (base/losses/gradcache.py: _minibatch_ranges, _create_minibatch):
    each column separately, in dataset order, cut into runs of mini_batch_size rows, or with
    mini_batch_num_tokens into runs of at most that many real tokens; each mini-batch keeps the
    columns up to its last attended position, i.e. it is padded to its own longest text.
    Flattened inputs (flash attention varlen, when available) carry no padding at all.
    """
    padded = real = largest = 0
    for f in features:
        if "cu_seq_lens_q" in f:
            n = int(f["cu_seq_lens_q"][-1])
            padded, real, largest = padded + n, real + n, max(largest, n)
            continue
        mask = f["attention_mask"]
        real += int(mask.sum())
        for begin, end in _st_ranges(mask.sum(dim=1).tolist(), mini_batch_size, num_tokens):
            part = mask[begin:end].bool()
            width = int(part.any(dim=0).nonzero().max()) + 1
            padded += part.shape[0] * width
            largest = max(largest, part.shape[0] * width)
    return padded, real, largest


def _st_ranges(lengths: list[int], size: int, num_tokens: int | None) -> list[tuple[int, int]]:
    """ST's mini-batch ranges: `size` rows each, or greedy runs of at most `num_tokens` real tokens
    (a longer text alone), rewritten here from its documented rule so the count needs no private API."""
    if num_tokens is None:
        return [(i, min(i + size, len(lengths))) for i in range(0, len(lengths), size)]
    out, begin, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > begin and total + n > num_tokens:
            out.append((begin, i))
            begin, total = i, 0
        total += n
    return out + [(begin, len(lengths))]


def load_pairs(data: str, n: int):
    """Part c's data: SNLI triples (short texts, 3 per example) or Wikipedia (title, paragraph) pairs
    (asset "wiki": titles of a few tokens, paragraphs of 40-250 words: a heavy-tailed passage length)."""
    if data == "snli":
        return load_triples(n)
    return read_source("wiki", str(assets.path("wiki") / "title_passage.jsonl"), limit=n)


def worker_compare(job: dict) -> dict:
    """Part c: our step and sentence-transformers' cached MNRL, same batches, interleaved step by step.

    Ours: padded length-grouped chunks of `chunk` examples; packed forwards with the same chunk; packed
    forwards cut by each token budget. ST: mini_batch_size = chunk x texts per example (forwards of as
    many texts as ours), and mini_batch_num_tokens = each budget (ST's packing by real-token count)."""
    from sentence_transformers import SentenceTransformer, losses

    dev = device()
    torch.manual_seed(0)
    b, chunk, steps, max_length = job["batch"], job["chunk"], job["steps"], job["max_length"]
    budgets = job.get("budgets") or []
    engine = build_engine(max_length, dev)
    source = load_pairs(job.get("data", "snli"), (steps + 1) * b)
    per_example = 2 + source.num_negatives
    ours_data = batches(source, engine.encoder.tokenize, b, steps + 1)

    model = SentenceTransformer(str(assets.path("minilm")), device=str(dev))
    model.max_seq_length = max_length
    model.train()
    # The same optimizer and decay rule (matrices only) as our engine's.
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR)

    def st_loss(**kw):
        return losses.CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, **kw)

    # ST's mini-batch counts texts, ours examples: mini_batch_size = chunk x texts per example runs
    # forwards of as many texts as ours.
    st_losses = {f"ST mini_batch_size={chunk * per_example}": st_loss(mini_batch_size=chunk * per_example)}
    st_losses.update({f"ST mini_batch_num_tokens={t}": st_loss(mini_batch_num_tokens=t) for t in budgets})
    ours = {f"ours chunk_size={chunk}": {"packed": False},
            f"ours chunk_size={chunk}, packed": {"packed": True}}
    ours.update({f"ours chunk_tokens={t}, packed": {"packed": True, "chunk_tokens": t} for t in budgets})

    def st_features(k: int) -> list[dict]:
        """One feature dict per column (anchors, positives, negatives), as ST's data collator makes them."""
        picked = rows(k, b, len(source.anchors))
        columns = [[source.anchors[r] for r in picked], [source.positives[r] for r in picked]]
        columns += [[source.negatives[r][j] for r in picked] for j in range(source.num_negatives)]
        feats = [model.preprocess(texts) for texts in columns]
        return [{key: v.to(dev) if isinstance(v, torch.Tensor) else v for key, v in f.items()} for f in feats]

    st_data = [st_features(k) for k in range(steps + 1)]
    st_flattened = any("cu_seq_lens_q" in f for f in st_data[0])

    parity = loss_parity(engine, model, next(iter(st_losses.values())), ours_data[0], st_data[0])

    def ours_step(batch, kw):
        per_chunk = b if "chunk_tokens" in kw else chunk  # a budget alone cuts the chunks
        rows = packing.row_tokens(job["max_length"], kw.get("chunk_tokens")) if kw.get("packed") else None
        stats = contrastive_step(engine, batch, LOSS, per_chunk, group_by_length=True, mask_duplicates=False,
                                 row_tokens=rows, **kw)  # packed rows as the trainer makes them
        engine.step()
        return stats

    trainable = [p for p in model.parameters() if p.requires_grad]

    def st_step(loss_fn, features):
        loss = loss_fn(features, None)  # labels are unused: the positive is the same row of column 1
        loss.backward()  # the loss's backward hook re-embeds each mini-batch with its cached gradient
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    names = [*ours, *st_losses]
    times: dict[str, list[float]] = {n: [] for n in names}
    loss_values: dict[str, list[float]] = {n: [] for n in names}
    ours_stats: dict[str, list] = {n: [] for n in ours}
    for k in range(steps + 1):  # interleaved rounds: a burst of background load hits every variant
        for name in names:
            if name in ours:
                t, stats = timed(dev, ours_step, ours_data[k], ours[name])
                loss = stats.loss
            else:
                t, loss = timed(dev, st_step, st_losses[name], st_data[k])
            if k:
                times[name].append(t)
                loss_values[name].append(loss)
                if name in ours:
                    ours_stats[name].append(stats)

    texts = b * per_example * steps
    tokens, largest = {}, {}
    for name, stats in ours_stats.items():
        tokens[name] = tokens_per_text(stats)
        largest[name] = max(s.largest_chunk for s in stats)
    for name, loss_fn in st_losses.items():
        counts = [st_tokens(f, loss_fn.mini_batch_size, loss_fn.mini_batch_num_tokens) for f in st_data[1:]]
        tokens[name] = (sum(c[0] for c in counts) / texts, sum(c[1] for c in counts) / texts)
        largest[name] = max(c[2] for c in counts)

    results = {}
    for name in names:
        t = median(times[name])
        results[name] = {
            "step_s": times[name], "median_step_s": t, "examples_per_s": b / t,
            "padded_tokens_per_text": tokens[name][0], "real_tokens_per_text": tokens[name][1],
            "largest_forward_tokens": largest[name], "loss": loss_values[name],
        }
    best_st = max((n for n in st_losses), key=lambda n: results[n]["examples_per_s"])
    for name in names:
        results[name]["throughput_vs_best_st"] = results[name]["examples_per_s"] / results[best_st]["examples_per_s"]
    return {"batch": b, "chunk": chunk, "max_length": max_length, "data": job.get("data", "snli"),
            "budgets": budgets, "st_flattened_inputs": st_flattened, "best_st": best_st,
            "loss_parity_dropout_off": parity, "results": results, "threads": torch.get_num_threads()}


def loss_parity(engine: TorchEngine, model, st_loss, batch, features: list[dict]) -> dict:
    """Both losses on one batch with dropout off and the same starting weights: they should agree to
    float rounding, which shows that the two sides compute the same objective on the same texts."""
    engine.module.eval()
    model.eval()
    try:
        with torch.no_grad():
            seqs = batch.query_ids + batch.passage_ids  # queries, then passages example-major
            emb = engine.forward(*pad(seqs, engine.encoder.pad_id, engine.encoder.left_pad))
            b = len(batch)
            ours = float(LOSS(make_pairing(emb[:b], emb[b:], batch, mask_duplicates=False, world=World())))
            theirs = float(st_loss(features, None))
    finally:
        engine.module.train()
        model.train()
    return {"ours": ours, "st": theirs, "abs_diff": abs(ours - theirs)}


WORKERS = {"step": worker_step, "compare": worker_compare}


# --- the driver ---------------------------------------------------------------------------------


# benchlib.FIXED_MMAP_THRESHOLD: without it glibc keeps freed activation memory, and the peak RSS
# grows with the number of differently shaped chunks (more at large batches) though the live
# tensors do not. --allocator-default measures without it.
ALLOCATOR_ENV: dict[str, str] = dict(FIXED_MMAP_THRESHOLD)


def spawn(job: dict) -> dict:
    """Run one job in a fresh interpreter (this file with --worker) and return its result."""
    t0 = time.perf_counter()
    out, tail, code = run_worker(__file__, job, ALLOCATOR_ENV)
    if out is None:
        print(f"  worker {job['kind']} batch={job['batch']} failed (exit {code}):\n    " + "\n    ".join(tail),
              file=sys.stderr)
        return {"error": "\n".join(tail), "exit_code": code, **{k: job[k] for k in ("batch", "chunk")}}
    out["wall_s"] = time.perf_counter() - t0
    return out


def fmt(x) -> str:
    """Three significant digits without exponents for tables."""
    if not isinstance(x, float):
        return "-" if x is None else str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def table(header: list[str], rows_: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows_]
    return "\n".join(lines)


def part_a(args) -> list[dict]:
    out = []
    for b in args.batches:
        print(f"  a: batch {b} ...", file=sys.stderr, flush=True)
        out.append(spawn({"kind": "step", "batch": b, "chunk": args.chunk, "steps": args.steps,
                          "max_length": args.max_length, "group_by_length": True}))
    ok = [r for r in out if "error" not in r]
    print(f"\n### a. Batch sweep (chunk {args.chunk} examples = {args.chunk * TEXTS_PER_EXAMPLE} texts per forward, "
          f"max_length {args.max_length}, median of {args.steps} steps)\n")
    print(table(["batch", "chunks", "s/step", "ms/example", "examples/s", "padded tok/text", "real tok/text",
                 "longest chunk (tokens)", "peak MiB"],
                [[r["batch"], r["chunks"], r["median_step_s"], 1000 * r["s_per_example"], r["examples_per_s"],
                  r["padded_tokens_per_text"], r["real_tokens_per_text"], r["widest_chunk_tokens"], r["peak_mib"]]
                 for r in ok]
                + [[r["batch"], "failed", "-", "-", "-", "-", "-", "-", "-"] for r in out if "error" in r]))
    if ok:
        print(f"\npeak includes AdamW's moments ({ok[0]['adam_state_mib']:.0f} MiB, allocated by the first step)")
    return out


def part_b(args) -> dict:
    b = args.compare_batch
    base = {"kind": "step", "batch": b, "steps": args.steps, "max_length": args.max_length}
    variants = {
        "cached": {**base, "chunk": args.chunk, "group_by_length": True, "floor": True},
        "cached_ungrouped": {**base, "chunk": args.chunk, "group_by_length": False},
        "uncached": {**base, "chunk": b, "group_by_length": True},
        "cached_packed": {**base, "chunk": args.chunk, "group_by_length": True, "floor": True, "packed": True},
    }
    if args.variants:  # a subset, e.g. the floors alone: cached,cached_packed
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    out = {}
    for name, job in variants.items():
        print(f"  b: {name} batch {b} ...", file=sys.stderr, flush=True)
        out[name] = spawn(job)
    print(f"\n### b. Cached vs uncached (batch {b}, max_length {args.max_length}, median of {args.steps} steps)\n")
    rows_ = []
    for name, r in out.items():
        if "error" in r:
            rows_.append([name, r["chunk"], "failed", "-", "-", "-", "-"])
        else:
            rows_.append([name, r["chunk"], r["median_step_s"], r["examples_per_s"], r["padded_tokens_per_text"],
                          r["real_tokens_per_text"], r["peak_mib"]])
    print(table(["variant", "chunk (examples)", "s/step", "examples/s", "padded tok/text", "real tok/text",
                 "peak MiB"], rows_))
    for name in ("cached", "cached_packed"):
        r = out.get(name, {"error": "not run"})
        if "error" in r:
            continue
        f = r["floor"]
        print(f"\n{name}: floor 1 + t_nograd / t_fwd_bwd = 1 + {f['median_nograd_forward_s']:.3g} s / "
              f"{f['median_forward_backward_s']:.3g} s = {f['floor']:.3f}; the step took "
              f"{r['median_step_s'] / (f['floor'] * f['median_forward_backward_s']):.3f}x its floor "
              "(floor x t_fwd_bwd, same chunks)")
    cached, uncached = out.get("cached", {"error": "not run"}), out.get("uncached", {"error": "not run"})
    if "error" not in cached and "error" not in uncached:
        out["ratio_cached_over_uncached"] = cached["median_step_s"] / uncached["median_step_s"]
        print(f"cached / uncached time: {out['ratio_cached_over_uncached']:.3f}")
    return out


def part_m(args) -> dict:
    """Peak memory under one token budget (--chunk-tokens) on short texts (SNLI) and a heavy-tailed
    passage length (Wikipedia paragraphs), padded and packed, each in a fresh process."""
    out = {}
    for data in ("snli", "wiki"):
        for packed in (False, True):
            name = f"{data}, {'packed' if packed else 'padded'}"
            print(f"  m: {name} ...", file=sys.stderr, flush=True)
            out[name] = spawn({"kind": "step", "batch": args.compare_batch, "chunk": args.compare_batch,
                               "steps": args.steps, "max_length": args.max_length, "group_by_length": True,
                               "data": data, "packed": packed, "chunk_tokens": args.chunk_tokens})
    print(f"\n### m. Peak memory at chunk_tokens={args.chunk_tokens} (batch {args.compare_batch}, max_length "
          f"{args.max_length}, {args.steps} steps after a warm-up)\n")
    print(table(["data, forward", "chunks", "s/step", "padded tok/text", "real tok/text", "largest chunk (tokens)",
                 "peak MiB"],
                [[n, r["chunks"], r["median_step_s"], r["padded_tokens_per_text"], r["real_tokens_per_text"],
                  r["largest_chunk_tokens"], r["peak_mib"]] if "error" not in r else [n, "failed"] + ["-"] * 5
                 for n, r in out.items()]))
    return out


def part_c(args) -> dict:
    print(f"  c: ours vs sentence-transformers, {args.data}, batch {args.compare_batch} ...", file=sys.stderr,
          flush=True)
    out = spawn({"kind": "compare", "batch": args.compare_batch, "chunk": args.chunk, "steps": args.steps,
                 "max_length": args.max_length, "data": args.data, "budgets": args.budgets})
    print(f"\n### c. Ours vs sentence-transformers CachedMultipleNegativesRankingLoss ({args.data}, batch "
          f"{args.compare_batch}, chunk {args.chunk} examples, max_length {args.max_length}, median of "
          f"{args.steps} interleaved rounds)\n")
    if "error" in out:
        print("failed: see stderr")
        return out
    print(table(["implementation", "s/step", "examples/s", "padded tok/text", "real tok/text",
                 "largest forward (tokens)", "throughput vs best ST"],
                [[n, r["median_step_s"], r["examples_per_s"], r["padded_tokens_per_text"], r["real_tokens_per_text"],
                  r["largest_forward_tokens"], r["throughput_vs_best_st"]] for n, r in out["results"].items()]))
    p = out["loss_parity_dropout_off"]
    print(f"\nloss on the first batch with dropout off: ours {p['ours']:.6f}, ST {p['st']:.6f} "
          f"(|diff| {p['abs_diff']:.2g}); ST flattened inputs: {out['st_flattened_inputs']}; best ST: {out['best_st']}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")],
                    help=f"part a's batch sizes, comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})")
    ap.add_argument("--chunk", type=int, help="examples per forward pass (default 32)")
    ap.add_argument("--compare-batch", type=int,
                    help="batch of parts b and c (default: the largest of --batches up to 256)")
    ap.add_argument("--max-length", type=int, default=64, help="max tokens per text (default 64)")
    ap.add_argument("--data", choices=["snli", "wiki"], default="snli",
                    help="part c's data: SNLI triples or Wikipedia (title, paragraph) pairs (default snli)")
    ap.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="part c's token budgets, comma-separated: ours chunk_tokens (packed) and ST's "
                         "mini_batch_num_tokens at each (default: none)")
    ap.add_argument("--steps", type=int, help="timed steps per configuration, after one warm-up (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: batches {QUICK['batches']}, chunk {QUICK['chunk']}, {QUICK['steps']} step "
                         "(explicit flags win)")
    ap.add_argument("--parts", default="a,b,c", help="which parts to run, e.g. a,c (default a,b,c; m: memory "
                                                     "under --chunk-tokens on short and long texts)")
    ap.add_argument("--variants", help="part b's variants to run, comma-separated (default all: cached, "
                    "cached_ungrouped, uncached, cached_packed)")
    ap.add_argument("--chunk-tokens", type=int, default=4096, help="part m's token budget (default 4096)")
    ap.add_argument("--out", help="JSON file for the raw results (default: a new file in the temp folder)")
    ap.add_argument("--allocator-default", action="store_true",
                    help="on CPU, leave glibc's dynamic mmap threshold on (peak RSS then includes freed memory "
                         "malloc keeps; by default workers run with MALLOC_MMAP_THRESHOLD_=1048576)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one job, in a fresh process
    args = ap.parse_args(argv)
    defaults = QUICK if args.quick else {"batches": DEFAULT_BATCHES, "chunk": 32, "steps": 3}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compare_batch is None:
        args.compare_batch = max([b for b in args.batches if b <= 256] or [min(args.batches)])
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(args.parts) - {"a", "b", "c", "m"}:
        ap.error(f"--parts: unknown part(s) {sorted(unknown)}; expected a, b, c, m")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        result = WORKERS[job["kind"]](job)
        Path(job["result"]).write_text(json.dumps(result))
        return

    if args.allocator_default:
        ALLOCATOR_ENV.clear()
    out = args.out or os.path.join(tempfile.gettempdir(), f"bench_gradcache-{time.strftime('%Y%m%d-%H%M%S')}.json")
    report = {"machine": machine(), "settings": {
        "worker_env": dict(ALLOCATOR_ENV),
        "batches": args.batches, "chunk": args.chunk, "compare_batch": args.compare_batch,
        "max_length": args.max_length, "steps": args.steps, "parts": args.parts, "texts_per_example": TEXTS_PER_EXAMPLE,
        "temperature": TEMPERATURE, "lr": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM,
        "dtype": "float32", "dropout": True, "argv": sys.argv[1:]}}
    print(f"# gradcache benchmark: {report['machine'].get('gpu', report['machine']['cpu'])}, "
          f"{report['machine']['torch_threads']} torch threads, torch {torch.__version__}")
    for part, run in (("a", part_a), ("b", part_b), ("c", part_c), ("m", part_m)):
        if part in args.parts:
            report[part] = run(args)
    report["machine"]["load_average_end"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw results: {out}")
    if failed := failures(report):
        sys.exit(f"{failed} configuration(s) failed; see above and the JSON's error fields")


def failures(report: dict) -> int:
    found = [r for r in report.get("a", [])]
    found += [r for r in report.get("b", {}).values() if isinstance(r, dict)]
    found += [report["c"]] if "c" in report else []
    found += list(report.get("m", {}).values())
    return sum("error" in r for r in found)


if __name__ == "__main__":
    main()
