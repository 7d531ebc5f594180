"""Is a model's Spearman on an STS-style task really below another's, or within sampling noise?

    python tools/paired_bootstrap.py --task '${asset:ood}/lee_docs.jsonl' --max-length 256 \
        BASE_MODEL OTHER_MODEL [MORE_MODELS ...]

A paired bootstrap (Efron & Tibshirani 1993) over the task's distinct texts, not its pairs: the
pairs of lee_docs are all 1,225 pairs of 50 documents, so they are not independent, and resampling
pairs would understate the noise. Each round draws the texts with replacement; a pair counts as
often as the product of its two texts' draws. Every model is scored on the same rounds, so the
differences to BASE_MODEL are paired. The cosines are the sts evaluator's (`evaluate.StsTask`).
Prints each model's Spearman, then for each other model the mean difference, its 95% interval and
the share of rounds below the base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import config  # noqa: E402
from train.embed import embedder  # noqa: E402
from train.evaluate import StsTask, spearman  # noqa: E402
from train.model import load_encoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+",
                    help="model folders or run dirs (${asset:NAME} allowed); the first is the base")
    ap.add_argument("--task", required=True, help="JSONL with sentence1, sentence2, score (${asset:NAME} allowed)")
    ap.add_argument("--max-length", type=int, help="tokens per text (default: each model's own)")
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config.register()  # the ${asset:NAME} resolver, as the configs use it
    paths = OmegaConf.to_container(OmegaConf.create({"task": args.task, "models": args.models}), resolve=True)
    task = StsTask("task", paths["task"], max_length=args.max_length)
    texts, left, right = task.texts, task.left, task.right  # [N] distinct texts; [pairs] each pair's two
    sims = [task.cosines(embedder(load_encoder(m, max_length=args.max_length).eval())) for m in paths["models"]]
    for m, s in zip(paths["models"], sims):
        print(f"{m}: Spearman {spearman(s, task.gold):.4f} ({len(left)} pairs of {len(texts)} texts)")
    rng = np.random.default_rng(args.seed)
    diffs = np.empty((args.rounds, len(sims) - 1))
    for k in range(args.rounds):
        drawn = np.bincount(rng.integers(0, len(texts), len(texts)), minlength=len(texts))  # [N]
        pairs = np.repeat(np.arange(len(left)), drawn[left] * drawn[right])
        scores = [spearman(s[pairs], task.gold[pairs]) for s in sims]
        diffs[k] = [x - scores[0] for x in scores[1:]]
    for j, m in enumerate(paths["models"][1:]):
        lo, hi = np.percentile(diffs[:, j], [2.5, 97.5])
        print(f"{m} - {paths['models'][0]}: mean {diffs[:, j].mean():+.4f}, 95% interval {lo:+.4f} .. {hi:+.4f}, "
              f"below the base in {(diffs[:, j] < 0).mean():.1%} of {args.rounds} rounds")


if __name__ == "__main__":
    main()
