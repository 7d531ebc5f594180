"""GPU benchmark of the training step: tokens/s, examples/s, peak memory and MFU, padded vs packed.

Models: all-MiniLM-L6-v2 (asset "minilm"), a BERT-base-size encoder (12 layers, 768-d, 3072 FFN,
randomly initialised with the MiniLM tokenizer: no plain BERT-base ships offline; throughput does not
depend on the weights) and SmolLM2-135M (asset "smollm2") with LoRA (r 16 on every linear layer,
last-token pooling). Data: SNLI triples (3 texts per example) at --max-length tokens. bf16 autocast,
dropout on, AdamW, InfoNCE at temperature 0.05; one step = contrastive_step + engine.step(), chunks
cut by --chunk-tokens. Batches 4,096 and 32,768 by default.

Padded: length-grouped chunks padded to their longest text (sdpa). Packed: train/packing.py, with
flash attention's varlen kernels when the flash_attn package is installed, else sdpa with the
block-diagonal mask (the `attn` column says which).

MFU = achieved FLOPs / the GPU's peak bf16 dense FLOPs (--peak-tflops, or a table of known GPUs).
FLOPs per real (not padded) token, N = the backbone's parameters without its embeddings (Kaplan et
al., arXiv 2001.08361): 6N is a forward and backward; a gradient-cached step runs one more forward
(no grad), so 8N is what it really computes. Attention's own FLOPs are left out of both. With LoRA,
6N overstates the backward (frozen weights get no weight gradient) and the columns say so.

    python tools/bench_gpu.py --out docs/bench/gpu-<date>.json     # about 5 minutes on an H100/H200
    python tools/bench_gpu.py --quick                              # CPU smoke test: tiny models, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import machine, reset_peak_kib, status_kib

from train import assets
from train.data import collate, read_source
from train.dist import World
from train.engines import TorchEngine
from train.gradcache import contrastive_step
from train.losses import contrastive_loss
from train.model import freeze_unused, load_encoder
from train.optim import param_groups

LOSS = functools.partial(contrastive_loss, temperature=0.05, symmetric=False)
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # bf16 dense
MODELS = ("minilm", "bert-base", "smollm2-lora")
QUICK_MODELS = ("tiny-bert", "tiny-llama-lora")


def bert_base_folder(tmp: Path) -> Path:
    """A randomly initialised BERT-base-size encoder with the MiniLM tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp / "bert-base-random"
    if not folder.exists():
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(assets.path("minilm"))
        BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def encoder_for(name: str, max_length: int, attn: str, tmp: Path):
    if name == "bert-base":
        return load_encoder(str(bert_base_folder(tmp)), pooling="mean", max_length=max_length,
                            attn_implementation=attn)
    if name in ("smollm2-lora", "tiny-llama-lora"):
        lora = LORA if name == "smollm2-lora" else {**LORA, "r": 4}
        return load_encoder(str(assets.path(name.removesuffix("-lora"))), pooling="last", max_length=max_length,
                            attn_implementation=attn, lora_config=lora)
    return load_encoder(str(assets.path(name)), pooling="mean", max_length=max_length, attn_implementation=attn)


def non_embedding_params(encoder) -> int:
    embed = {id(p) for p in encoder.backbone.get_input_embeddings().parameters()}
    for m in encoder.backbone.modules():  # BERT's position and token-type tables
        if isinstance(m, torch.nn.Embedding):
            embed |= {id(p) for p in m.parameters()}
    return sum(p.numel() for p in encoder.backbone.parameters() if id(p) not in embed)


def peak_tflops(dev: torch.device, given: float | None) -> float | None:
    if given or dev.type != "cuda":
        return given
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def run_one(name: str, packed: bool, batch: int, args, data, dev: torch.device, tmp: Path) -> dict:
    attn = "flash_attention_2" if packed and flash_available() else "sdpa"
    torch.manual_seed(0)
    encoder = encoder_for(name, args.max_length, attn, tmp).to(dev)
    freeze_unused(encoder)
    encoder.train()
    engine = TorchEngine(encoder, World(device=dev), lambda m: torch.optim.AdamW(param_groups(m, 0.01), lr=2e-5),
                         lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 1.0, bf16=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = reset_peak_kib() * 1024
    times, stats = [], []
    for k in range(args.steps + 1):  # k == 0: warm-up (kernels, allocator, AdamW's moments)
        b = data[k % len(data)]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        s = contrastive_step(engine, b, LOSS, batch, chunk_tokens=args.chunk_tokens, packed=packed,
                             mask_duplicates=False)
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if k:
            times.append(time.perf_counter() - t0)
            stats.append(s)
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else status_kib("VmHWM") * 1024) - base
    t = statistics.median(times)
    real = statistics.median(s.real_tokens for s in stats)
    n = non_embedding_params(encoder)
    top = peak_tflops(dev, args.peak_tflops)
    mfu = {f: (f * n * real / t) / (top * 1e12) if top else None for f in (6, 8)}
    out = {"model": name, "packed": packed, "attn": attn, "batch": batch, "median_step_s": t, "step_s": times,
           "examples_per_s": batch / t, "real_tokens_per_s": real / t,
           "processed_tokens_per_s": statistics.median(s.padded_tokens for s in stats) / t,
           "padded_over_real": sum(s.padded_tokens for s in stats) / sum(s.real_tokens for s in stats),
           "chunks": stats[0].chunks, "peak_gib": peak / 2**30, "non_embedding_params": n,
           "lora": "lora" in name, "mfu_6n": mfu[6], "mfu_8n": mfu[8], "peak_tflops": top}
    del engine, encoder
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    ap.add_argument("--batches", default="4096,32768", help="examples per step, comma-separated")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=32768, help="tokens per forward pass (trainer.chunk_tokens)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration after one warm-up")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak bf16 dense TFLOP/s for MFU")
    ap.add_argument("--quick", action="store_true",
                    help=f"CPU smoke test: {', '.join(QUICK_MODELS)}, batch 16, 1 step, 128-token chunks")
    ap.add_argument("--out", help="JSON file for the raw results")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.steps, args.max_length, args.chunk_tokens = \
            ",".join(QUICK_MODELS), "16", 1, 32, 128
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    source = read_source("snli", str(assets.path("snli") / "train_triples.jsonl"))
    report = {"machine": machine(), "settings": {k: v for k, v in vars(args).items()}, "runs": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    try:
        for name in args.models:
            tokenize = encoder_for(name, args.max_length, "sdpa", tmp).tokenize  # tokenizer only (+ weights, once)
            for batch in args.batches:
                n = len(source.anchors)
                data = [collate([source], [(0, (k * batch + i) % n) for i in range(batch)], tokenize)
                        for k in range(2)]
                for packed in (False, True):
                    print(f"  {name} batch {batch} {'packed' if packed else 'padded'} ...", file=sys.stderr,
                          flush=True)
                    try:
                        report["runs"].append(run_one(name, packed, batch, args, data, dev, tmp))
                    except torch.OutOfMemoryError as e:
                        report["runs"].append({"model": name, "packed": packed, "batch": batch,
                                               "error": f"out of memory: {str(e).splitlines()[0]}"})
                        torch.cuda.empty_cache()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = ["model", "batch", "forward", "attn", "s/step", "examples/s", "real tok/s", "padded/real",
              "peak GiB", "MFU 6N", "MFU 8N"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in report["runs"]:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {'packed' if r['packed'] else 'padded'} | {r['error']} |")
            continue
        mfu = [f"{100 * r[k]:.1f}%" if r[k] is not None else "-" for k in ("mfu_6n", "mfu_8n")]
        print(f"| {r['model']} | {r['batch']} | {'packed' if r['packed'] else 'padded'} | {r['attn']} | "
              f"{r['median_step_s']:.3g} | {r['examples_per_s']:.4g} | {r['real_tokens_per_s']:.4g} | "
              f"{r['padded_over_real']:.2f} | {r['peak_gib']:.2f} | {mfu[0]} | {mfu[1]} |")
    report["machine"]["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report["runs"]


if __name__ == "__main__":
    main()
