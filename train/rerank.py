"""The cross-encoder's training step and its scoring pass, on the same engines as the embedder's.

    rerank_step(engine, batch, loss_fn, ...)    forward + loss + backward of one batch on this rank
    scorer(engine, batch_size)                  (query, passage) pairs -> [P] scores, for evaluation

A cross-encoder's loss is a mean over queries of a function of that query's own group of scores
[1+n] (losses.rerank_loss): nothing crosses examples or ranks. So, unlike the embedder's step
(gradcache.py), a batch too large for one forward needs no cache: each chunk of whole examples is
forwarded, its share of the loss backpropagated, and the chunk forgotten. Every backward but the
step's last runs with gradient reduction off; under DDP the average over ranks of each rank's
mean is the mean over the global batch, as on one process.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from train.data import PairBatch
from train.gradcache import Abandoned, StepStats
from train.model import pad


def rerank_step(engine, batch: PairBatch, loss_fn: Callable[[torch.Tensor], torch.Tensor], chunk_size: int,
                group_by_length: bool = True, scale: float = 1.0, reduce: bool = True,
                stop: Callable[[], bool] | None = None) -> StepStats:
    """chunk_size: examples per forward pass (each brings 1 + n pairs). scale: multiplies the loss
    (1 / accumulated batches). reduce: whether the last backward reduces gradients across ranks.
    stop: a collective asked before every chunk but the first (every rank has as many chunks: the
    per-rank batch is the same); True raises gradcache.Abandoned, the caller discards the gradients."""
    b, group, ids = len(batch), batch.group, batch.pair_ids
    longest = [max(len(ids[i * group + j]) for j in range(group)) for i in range(b)]
    order = sorted(range(b), key=lambda i: -longest[i]) if group_by_length else list(range(b))
    chunks = [order[s : s + chunk_size] for s in range(0, b, chunk_size)]  # examples, longest first
    enc = engine.encoder
    stats = StepStats(0.0, len(chunks), len(ids), 0, sum(len(s) for s in ids))
    total = 0.0
    for k, examples in enumerate(chunks):
        if k and stop is not None and stop():
            raise Abandoned()
        rows = [i * group + j for i in examples for j in range(group)]
        input_ids, mask = pad([ids[r] for r in rows], enc.pad_id, enc.left_pad)  # [c*(1+n), L]
        stats.padded_tokens += input_ids.numel()
        stats.largest_chunk = max(stats.largest_chunk, input_ids.numel())
        last = k == len(chunks) - 1
        with contextlib.nullcontext() if (reduce and last) else engine.no_sync():
            scores = engine.forward(input_ids, mask).view(len(examples), group)  # [c, 1+n]
            loss = loss_fn(scores) * (len(examples) / b)  # this chunk's share of the mean over b
            engine.backward(loss * scale)
        total += float(loss.detach())
    stats.loss = total
    return stats


def scorer(engine, batch_size: int) -> Callable[[Sequence[tuple[str, str]]], torch.Tensor]:
    """(query, passage) pairs -> [P] scores on every rank. Every rank scores all pairs (a sharded
    model's forward is a collective, so all ranks must run the same batches): evaluation sets of
    re-ranking are a few thousand pairs."""
    enc = engine.encoder

    @torch.no_grad()
    def score(pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        ids = enc.tokenize(pairs)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths pad together
        out = torch.empty(len(ids))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            input_ids, mask = pad([ids[i] for i in idx], enc.pad_id, enc.left_pad)
            out[idx] = engine.forward(input_ids, mask).float().cpu()
        return out

    return score
