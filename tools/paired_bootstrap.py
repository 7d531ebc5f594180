"""Is a model's Spearman on an STS-style task really below another's, or within sampling noise?

    python tools/paired_bootstrap.py --task '${asset:ood}/lee_docs.jsonl' --max-length 256 \
        BASE_MODEL OTHER_MODEL [MORE_MODELS ...]

A paired bootstrap (Efron & Tibshirani 1993) over the task's distinct texts, not its pairs: the
pairs of lee_docs are all 1,225 pairs of 50 documents, so they are not independent, and resampling
pairs would understate the noise. Each round draws the texts with replacement; a pair counts as
often as the product of its two texts' draws. Every model is scored on the same rounds, so the
differences to BASE_MODEL are paired. Prints each model's Spearman, then for each other model the
mean difference, its 95% interval and the share of rounds below the base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import assets  # noqa: E402
from train.embed import encode  # noqa: E402
from train.model import load_encoder  # noqa: E402


def cosines(path: str, texts: list[str], left: np.ndarray, right: np.ndarray, max_length: int | None) -> np.ndarray:
    """[pairs] cosine of each pair's two texts, each text embedded once."""
    enc = load_encoder(path, max_length=max_length).eval()
    with torch.no_grad():
        # side "query", as the evaluator's sts tasks embed (a prompted model gets its query prompt)
        emb = torch.nn.functional.normalize(encode(enc, texts, "query", batch_size=16), dim=-1).numpy()  # [N, D]
    return (emb[left] * emb[right]).sum(1)


def resolve(path: str) -> str:
    """`${asset:NAME}/rest` -> the shipped asset's folder + rest, as the configs write it."""
    if not path.startswith("${asset:"):
        return path
    name, rest = path[len("${asset:"):].split("}", 1)
    return str(assets.path(name)) + rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+",
                    help="model folders or run dirs (${asset:NAME} allowed); the first is the base")
    ap.add_argument("--task", required=True, help="JSONL with sentence1, sentence2, score (${asset:NAME} allowed)")
    ap.add_argument("--max-length", type=int, help="tokens per text (default: each model's own)")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    args.models = [resolve(m) for m in args.models]
    rows = [json.loads(line) for line in open(resolve(args.task))]
    texts = sorted({r["sentence1"] for r in rows} | {r["sentence2"] for r in rows})
    index = {t: i for i, t in enumerate(texts)}
    left = np.array([index[r["sentence1"]] for r in rows])  # [pairs]
    right = np.array([index[r["sentence2"]] for r in rows])
    gold = np.array([float(r["score"]) for r in rows])
    sims = [cosines(m, texts, left, right, args.max_length) for m in args.models]
    for m, s in zip(args.models, sims):
        print(f"{m}: Spearman {spearmanr(s, gold).statistic:.4f} ({len(rows)} pairs of {len(texts)} texts)")
    rng = np.random.default_rng(args.seed)
    diffs = np.empty((args.rounds, len(sims) - 1))
    for k in range(args.rounds):
        drawn = np.bincount(rng.integers(0, len(texts), len(texts)), minlength=len(texts))  # [N]
        pairs = np.repeat(np.arange(len(rows)), drawn[left] * drawn[right])
        scores = [spearmanr(s[pairs], gold[pairs]).statistic for s in sims]
        diffs[k] = [x - scores[0] for x in scores[1:]]
    for j, m in enumerate(args.models[1:]):
        lo, hi = np.percentile(diffs[:, j], [2.5, 97.5])
        print(f"{m} - {args.models[0]}: mean {diffs[:, j].mean():+.4f}, 95% interval {lo:+.4f} .. {hi:+.4f}, "
              f"below the base in {(diffs[:, j] < 0).mean():.1%} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
