"""What the Matryoshka loss's re-normalisation costs (issue 17, point 3), before and after.

`gradcache.loss_backward` evaluates the loss a block of query rows at a time (2**22 scores per
block), and every block reads all gathered embeddings [P, D]. This times, on random unit embeddings
of one rank's step (loss_backward, then the surrogate's backward):

  plain                 InfoNCE at the full dimension
  matryoshka            InfoNCE per prefix (matryoshka_dims), each prefix re-normalised once per step
                        (loss_backward: Pairing.prefixes)
  matryoshka per block  the same loss hidden behind a lambda, so loss_backward does not see its
                        dimensions and losses.truncated re-normalises every prefix in every block, as
                        before commit "Matryoshka prefixes re-normalised once per step"

    python tools/bench_loss.py --rows 512 --columns 65536 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.gradcache import BLOCK_ELEMENTS, loss_backward  # noqa: E402
from train.losses import EmbeddingLoss, Pairing  # noqa: E402


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024, help="this rank's queries b (default 1024)")
    ap.add_argument("--columns", type=int, default=65536, help="gathered passages P (default 65536)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--dims", default="384,256,128,64", help="Matryoshka prefixes (default 384,256,128,64)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    dims = [int(d) for d in args.dims.split(",")]
    torch.manual_seed(0)
    b, P, D = args.rows, args.columns, args.dim
    q = F.normalize(torch.randn(b, D), dim=-1).requires_grad_(True)  # [b, D]
    p_all = F.normalize(torch.randn(P, D), dim=-1).requires_grad_(True)  # [P, D]
    pair = Pairing(q=q, q_all=q, p_all=p_all, row0=0, group=P // b)  # each query's positive at row * group
    plain = EmbeddingLoss(temperature=0.05)
    matryoshka = EmbeddingLoss(temperature=0.05, matryoshka_dims=dims)
    blocks = -(-b // max(1, BLOCK_ELEMENTS // P))

    def step(loss_fn):
        surrogate, _ = loss_backward(loss_fn, pair, 1.0)
        surrogate.backward()

    variants = {"plain": plain, "matryoshka": matryoshka,
                "matryoshka per block": lambda part: matryoshka(part)}  # not a partial: prefixes per block
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps + 1):  # the first round warms up
        for name, loss_fn in variants.items():
            times[name].append(timed(step, loss_fn))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    report = {"rows": b, "columns": P, "dim": D, "dims": dims, "blocks": blocks, "threads": torch.get_num_threads(),
              "seconds": times, "median_s": med,
              "per_block_over_once": med["matryoshka per block"] / med["matryoshka"],
              "matryoshka_over_plain": med["matryoshka"] / med["plain"]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
