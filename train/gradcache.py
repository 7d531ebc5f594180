"""One contrastive batch through the model: forward, loss, backward, gradient-cached when
the batch does not fit.

GradCache (Gao et al., arXiv 2101.06983) makes the contrastive batch independent of
memory. With b examples on this rank and chunks of c examples:

  1. no-grad forward of each chunk, saving the RNG state first so that dropout can be
     replayed exactly (SimCSE's only augmentation *is* dropout, arXiv 2104.08821);
  2. the loss on the detached embeddings, gathered from all ranks; its backward fills
     only the embedding gradients  d loss / d emb  [b*(2+n), D];
  3. per chunk: restore the RNG, forward with grad, backward <emb_chunk, cached grad>,
     whose parameter gradient is exactly the chunk's share of d loss / d theta.
     Every backward but the step's last runs with gradient reduction off, so the
     parameters' gradients are reduced once per optimizer step.

Chunks group texts of similar length, each padded only to its own longest text: the
loss does not depend on the order of texts, and padding is most of the cost on short
texts. With c >= b there is one chunk and no caching: one forward, loss, backward.

Preemption inside a step: a step of a large batch runs for minutes on many chunks, longer than a
scheduler's grace period (torchrun and SLURM kill about 30 s after SIGTERM). Given `stop`, the step
asks it at every chunk boundary (every rank at the same boundaries: it is a collective) and, when it
says so, raises `Abandoned` there: no parameter has changed before the optimizer step, so the caller
only discards the accumulated gradients and checkpoints the last finished step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from train import dist, packing
from train.data import Batch
from train.losses import Pairing, prefix
from train.model import pad


def plan_chunks(lengths: Sequence[int], per_chunk: int, by_length: bool = True,
                max_tokens: int | None = None) -> list[list[int]]:
    """Split text indices into chunks of at most `per_chunk` texts; longest first when grouping by
    length, so the chunk that needs the most memory runs first and an OOM shows at once.

    max_tokens: a chunk also holds at most this many tokens once padded (texts x its longest), so
    memory follows the budget and not the length distribution: a chunk of 512-token passages holds
    few, one of 10-token queries many. A text longer than the budget gets a chunk of its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if by_length else list(range(len(lengths)))
    if max_tokens is None:
        return [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]
    chunks: list[list[int]] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if chunks and len(chunks[-1]) < per_chunk and (len(chunks[-1]) + 1) * grown <= max_tokens:
            chunks[-1].append(i)
            longest = grown
        else:
            chunks.append([i])
            longest = lengths[i]
    return chunks


def rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def make_pairing(q: torch.Tensor, p: torch.Tensor, batch: Batch, mask_duplicates: bool,
                 world: dist.World, gather_queries: bool = True) -> Pairing:
    """Local embeddings -> what the loss sees: all ranks' passages and queries, positive
    columns, text hashes for the false-negative masks. q [b, D], p [b*(1+n), D].
    On a one-rank world nothing is gathered (the merge search's single-process loss).
    gather_queries=False: only the passage -> query direction (loss.symmetric) reads other ranks'
    queries, so without it q_all is the local q and one collective per step is saved."""
    b, dev = q.shape[0], q.device
    q_all = dist.gather_with_grad(q, world) if gather_queries else q  # [W*b, D] (or [b, D])
    p_all = dist.gather_with_grad(p, world)  # [W*b*(1+n), D]
    anchors = passages = None
    if mask_duplicates:
        anchors = dist.gather(batch.anchor_hash.to(dev), world)  # [W*b]
        passages = dist.gather(batch.passage_hash.to(dev), world)  # [W*b*(1+n)]
    teacher = batch.teacher.to(dev) if batch.teacher is not None else None
    return Pairing(q=q, q_all=q_all, p_all=p_all, row0=world.rank * b, group=batch.group, anchor_ids=anchors,
                   passage_ids=passages, teacher=teacher)


# Scores per block of query rows: 2**22 floats (16 MiB) for each [rows, W*b*(1+n)] matrix
# the loss makes, instead of all b rows at once (at b = 4096 with one hard negative, one
# such matrix would be 128 MiB, and cross-entropy keeps several).
BLOCK_ELEMENTS = 2**22


def loss_backward(loss_fn: Callable[[Pairing], torch.Tensor], pair: Pairing,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss, and its backward into the embeddings, computed a block of query rows at a time.

    Valid for any loss that is a mean over query rows (losses.py). Gradients w.r.t. the local
    and gathered embeddings are accumulated on detached copies first, then pushed through the
    gather (one collective) and into whatever produced the embeddings with one surrogate
    backward, which is returned for the caller to run (through the engine when the model's
    graph is attached). Returns (surrogate, loss value).
    """
    tensors = [pair.q, pair.q_all, pair.p_all]
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    # Matryoshka prefixes, re-normalised once here rather than by every block (each block's loss reads all of
    # q_all and p_all: at P = 65,536 columns, 64 rows per block, re-normalising them per block took 62% of
    # the loss's time, tools/bench_loss.py). Blocks accumulate into `held`; one backward through `cut` then.
    cuts, held = [], {}
    for d in getattr(loss_fn, "prefix_dims", ()):  # losses.EmbeddingLoss; any other function: none
        cut = [prefix(leaf, d) for leaf in leaves]  # [b, d], [W*b, d], [P, d]
        held[d] = tuple(c.detach().requires_grad_(True) for c in cut)
        cuts.append((cut, held[d]))
    base = replace(pair, q=leaves[0], q_all=leaves[1], p_all=leaves[2], prefixes=held or None)
    b = pair.q.shape[0]
    block = max(1, BLOCK_ELEMENTS // max(pair.p_all.shape[0], pair.q_all.shape[0]))
    total = torch.zeros((), dtype=pair.q.dtype, device=pair.q.device)
    for start in range(0, b, block):
        part = base.rows(start, min(b, start + block))
        loss = loss_fn(part) * (part.q.shape[0] / b)  # the mean over all b rows, in parts
        (loss * scale).backward()
        total += loss.detach()
    for cut, kept in cuts:  # the prefixes' gradients into the leaves, through one normalisation each
        grads = [(c, k.grad) for c, k in zip(cut, kept) if k.grad is not None]
        if grads:
            torch.autograd.backward([c for c, _ in grads], [g for _, g in grads])
    surrogate = sum((t * leaf.grad).sum() for t, leaf in zip(tensors, leaves) if leaf.grad is not None)
    return surrogate, total


class Abandoned(Exception):
    """The step was given up at a chunk boundary because `stop()` said so; parameters are untouched,
    gradients may hold part of the step (the caller discards them)."""


@dataclass
class StepStats:
    loss: float
    chunks: int
    texts: int
    padded_tokens: int  # tokens the model processed (padding included)
    real_tokens: int
    largest_chunk: int = 0  # padded tokens of the largest forward pass: what sets the memory peak


def chunk_inputs(seqs: list[list[int]], per_chunk: int, encoder, group_by_length: bool = True,
                 chunk_tokens: int | None = None, packed: bool = False, row_tokens: int | None = None
                 ) -> tuple[list[list[int]], list[tuple[torch.Tensor, ...]]]:
    """A rank's token ids -> (each forward's text indices, each forward's inputs): padded (ids, mask)
    [n, L] or packed (ids, mask, seg) [R, T]; contrastive_step's plan, also what tools/ benchmark."""
    if packed:  # several texts per row, positions and attention per text (train/packing.py)
        # rows as long as the rank's longest text: on a kernel that takes the block mask, attention
        # costs rows x row^2, so short texts at a large max_length must not sit in max_length rows
        row = row_tokens or max(len(s) for s in seqs)
        plans = packing.plan_chunks([len(s) for s in seqs], per_chunk, row, chunk_tokens)
        return ([[i for r in rows for i in r] for rows in plans],
                [packing.pack(seqs, rows, encoder.pad_id) for rows in plans])
    chunks = plan_chunks([len(s) for s in seqs], per_chunk, group_by_length, chunk_tokens)
    return chunks, [pad([seqs[i] for i in c], encoder.pad_id, encoder.left_pad) for c in chunks]


def contrastive_step(engine, batch: Batch, loss_fn: Callable[[Pairing], torch.Tensor], chunk_size: int,
                     group_by_length: bool = True, mask_duplicates: bool = True, scale: float = 1.0,
                     reduce: bool = True, chunk_tokens: int | None = None,
                     gather_queries: bool = True, packed: bool = False, row_tokens: int | None = None,
                     stop: Callable[[], bool] | None = None) -> StepStats:
    """Forward, loss and backward of one contrastive batch on this rank.

    chunk_size: examples per forward pass (each example brings 1 query + group passages).
    chunk_tokens: also at most this many padded tokens per forward pass (None: no budget).
    gather_queries: whether the loss reads other ranks' queries (false unless loss.symmetric).
    packed: packed forwards (train/packing.py): the rank's texts laid end to end in rows of
    `row_tokens` (None: its longest text), so chunk_tokens counts rows x the fullest row.
    scale: multiplies the loss (1 / accumulated batches).  reduce: whether this batch's
    final backward reduces gradients across ranks (the optimizer step's last batch).
    stop: a collective asked at each chunk boundary (before every no-grad forward, before the loss,
    before every replayed chunk but the first); True raises `Abandoned` on every rank.
    """
    seqs = batch.query_ids + batch.passage_ids
    b = len(batch)
    chunks, inputs = chunk_inputs(seqs, chunk_size * (1 + batch.group), engine.encoder, group_by_length,
                                  chunk_tokens, packed, row_tokens)
    dev = engine.world.device
    stats = StepStats(0.0, len(chunks), len(seqs), sum(x[0].numel() for x in inputs),
                      sum(len(s) for s in seqs), max(x[0].numel() for x in inputs))

    def sync(last: bool):
        return contextlib.nullcontext() if (reduce and last) else engine.no_sync()

    if len(chunks) == 1:  # the batch fits: no caching
        with sync(True):
            out = engine.forward(*inputs[0])  # [b*(2+n), D] in chunk order
            emb = out[torch.argsort(torch.as_tensor(chunks[0], device=out.device))]  # text order
            pair = make_pairing(emb[:b], emb[b:], batch, mask_duplicates, engine.world, gather_queries)
            surrogate, loss = loss_backward(loss_fn, pair, scale)
            engine.backward(surrogate)
        stats.loss = float(loss)
        return stats

    # Every rank must ask `stop` at the same boundaries: with a token budget or packed rows the ranks'
    # chunk counts differ, so the boundaries asked are those of the smallest count (one more
    # collective per batch).
    same_counts = chunk_tokens is None and not packed
    asked = len(chunks) if stop is None or same_counts else dist.min_over_ranks(len(chunks), engine.world)

    def check(k: int) -> None:
        if stop is not None and k < asked and stop():
            raise Abandoned()

    # 1. no-grad pass, remembering the RNG state in front of every chunk
    states, parts = [], []
    with torch.no_grad():
        for k, x in enumerate(inputs):
            check(k)
            states.append(rng_state(dev))
            parts.append(engine.forward(*x))  # [c*(2+n), D]
    after = rng_state(dev)
    check(0)  # before the loss: its gather is the first collective that moves every rank's embeddings
    emb = torch.empty((len(seqs), parts[0].shape[1]), dtype=parts[0].dtype, device=parts[0].device)
    emb[torch.as_tensor([i for c in chunks for i in c], device=emb.device)] = torch.cat(parts)
    emb.requires_grad_(True)

    # 2. loss on cached embeddings: the backward stops at emb (no parameter in this graph)
    pair = make_pairing(emb[:b], emb[b:], batch, mask_duplicates, engine.world, gather_queries)
    surrogate, loss = loss_backward(loss_fn, pair, scale)
    surrogate.backward()
    grad = emb.grad  # [b*(2+n), D]

    # 3. replay each chunk with its RNG and push the cached gradient into the parameters
    for k, (c, x) in enumerate(zip(chunks, inputs)):
        if k:
            check(k)  # only this step's gradients so far: the caller discards them
        set_rng_state(states[k], dev)
        with sync(k == len(chunks) - 1):
            out = engine.forward(*x)
            engine.backward((out * grad[torch.as_tensor(c, device=grad.device)]).sum())
    set_rng_state(after, dev)
    stats.loss = float(loss)
    return stats
