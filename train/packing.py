"""Packed (padding-free) forwards: many texts in one row, each seeing only itself.

A padded chunk computes every layer on `texts x longest` tokens; a packed one lays the texts end
to end in rows of `row` tokens (first-fit, longest first), so only the rows' tails are padding.
What keeps the texts apart:

- positions restart at each text (BERT's absolute position embeddings, Llama's rotary ones), and
  BERT's token types are all 0 as in the padded forward;
- attention stays inside each text. An encoder on the sdpa kernel on CPU, in rows of SEGMENT_ROWS
  tokens or more, runs it text by text
  (`segment_attention`, registered with transformers as SEGMENTS): each text's own [L, L]
  scores, no [T, T] mask, and attention dropout drawn over those alone; the scores are recomputed
  in the backward rather than kept, so a chunk's memory follows its tokens. Otherwise (eager, and
  decoders) a block-diagonal 4D mask (causal inside a block for a decoder): a row then costs
  row^2 in attention, and the dropout mask is drawn over all of it (on CPU, a sixth of a packed
  step at 256 tokens went to drawing it); rows are at most `row` tokens (the rank's longest text
  by default: contrastive_step), so a row's attention costs what one padded text's does;
- with flash attention (CUDA), the rows are flattened into one and transformers' varlen path
  reads the sequence boundaries from the restarting position ids (no mask, no row^2 work);
- pooling is computed per text from the packed output (a segment mean, a segment's first or
  last token), in the chunk's text order, as `model.pool` does on the padded layout.

Layout: ids [R, T], mask [R, T] (0 pad, 1 pooled, 2 context: as `model.pad`), seg [R, T] (the
text each token belongs to, -1 for padding). Pads attend to pads only, so no row of the
attention matrix is empty (an all-masked row is NaN in sdpa) and no text sees them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

FLASH = ("flash_attention_2", "flash_attention_3")
MASKED = ("sdpa", "eager")  # kernels that take the 4D block mask
SEGMENTS = "train_segments"  # our attention implementation: text by text within packed rows
# Rows at least this wide attend text by text (CPU sdpa encoders); narrower ones keep one sdpa call per
# row under the block mask, which is cheap there (rows^2 small) and is a few large ops instead of one
# per text length: the quickstart's 32-token rows took 150-285 s a step text by text with 2 torch
# threads on a loaded machine (2026-12-01, not measured side by side), where the block mask takes ~3 s
# idle. Measured text by text: 256-token rows (docs/benchmarks.md, packing).
SEGMENT_ROWS = 128


def plan_rows(lengths: Sequence[int], row: int) -> list[list[int]]:
    """Text indices -> rows of at most `row` tokens, first-fit over the texts longest first
    (within 11/9 of the fewest rows possible; Johnson 1973). A text longer than `row` gets a
    row of its own, as long as itself."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        k = next((r for r in range(len(rows)) if room[r] >= n), None)
        if k is None:
            rows.append([i])
            room.append(max(row, n) - n)
        else:
            rows[k].append(i)
            room[k] -= n
    return rows


def pack(seqs: Sequence[Sequence[int]], rows: list[list[int]], pad_id: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token id lists and a row plan (indices into seqs) -> (ids, mask, seg), each [R, T] with
    T the fullest row; seg numbers the texts 0, 1, ... in row order, [i for r in rows for i in r],
    which is the order of the embeddings the packed forward returns."""
    width = max(sum(len(seqs[i]) for i in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    k = 0
    for r, texts in enumerate(rows):
        at = 0
        for i in texts:
            s = seqs[i]
            ids[r, at : at + len(s)] = torch.as_tensor(s)
            mask[r, at : at + len(s)] = 1
            mask[r, at : at + getattr(s, "context", 0)] = 2
            seg[r, at : at + len(s)] = k
            at, k = at + len(s), k + 1
    return ids, mask, seg


def row_tokens(max_length: int, chunk_tokens: int | None) -> int | None:
    """How long packed rows are: `max_length` under a token budget, else None (the rank's longest text).

    On a kernel that takes the block mask a row's attention costs row^2. Rows as long as the longest
    text cost the least attention, but then a chunk of short texts takes a fraction of the memory a
    chunk of long ones takes at the same budget, and the peak shows only when long texts come, hours
    into a run. Under `trainer.chunk_tokens` every chunk is therefore laid out in max_length rows and
    costs what the budget allows whatever the lengths (docs/benchmarks.md, packing part m)."""
    return max_length if chunk_tokens is not None else None


def plan_chunks(lengths: Sequence[int], per_chunk: int, row: int, max_tokens: int | None = None
                ) -> list[list[list[int]]]:
    """Text indices -> chunks of rows: the rank's texts packed first (plan_rows, so long passages
    and short queries share rows), then consecutive rows grouped while a chunk holds at most
    `per_chunk` texts and `max_tokens` tokens (rows x the fullest row). A row with more texts than
    `per_chunk` (many short ones) is a chunk of its own: its tokens, not its texts, set memory."""
    chunks: list[list[list[int]]] = []
    texts = width = 0  # the current chunk's texts and its fullest row (pack pads rows to it)
    for r in plan_rows(lengths, row):
        fill = sum(lengths[i] for i in r)
        fits = chunks and texts + len(r) <= per_chunk and (
            max_tokens is None or (len(chunks[-1]) + 1) * max(width, fill) <= max_tokens)
        if fits:
            chunks[-1].append(r)
            texts, width = texts + len(r), max(width, fill)
        else:
            chunks.append([r])
            texts, width = len(r), fill
    return chunks


def positions(seg: torch.Tensor) -> torch.Tensor:
    """seg [R, T] -> [R, T]: 0, 1, 2, ... from each text's first token (padding counts from its
    own first token too; it is never pooled)."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    new = torch.ones_like(seg, dtype=torch.bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values  # each token's text start
    return idx - start


def block_mask(seg: torch.Tensor, causal: bool, kernel: str, dtype: torch.dtype) -> torch.Tensor:
    """seg [R, T] -> the 4D mask [R, 1, T, T] in which a token sees only its own text (and, for a
    decoder, only the text's earlier tokens): bool for sdpa (True = attend), additive for eager."""
    keep = seg[:, :, None] == seg[:, None, :]  # [R, T, T]
    if causal:
        keep = keep & torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device).tril()
    keep = keep[:, None]  # [R, 1, T, T]
    if kernel == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=seg.device).masked_fill(~keep, torch.finfo(dtype).min)


def pool(hidden: torch.Tensor, mask: torch.Tensor, seg: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [R, T, D], mask and seg [R, T] -> [N, D], text i's embedding in row i, for the
    poolings of `model.pool`: mean (over mask == 1), cls (a text's first token), last (its last)."""
    d = hidden.shape[-1]
    h, m, s = hidden.reshape(-1, d), mask.reshape(-1), seg.reshape(-1)  # [R*T, D], [R*T], [R*T]
    n = int(s.max()) + 1
    if how == "mean":
        keep = m == 1
        total = torch.zeros((n, d), dtype=h.dtype, device=h.device).index_add_(0, s[keep], h[keep])
        count = torch.bincount(s[keep], minlength=n).clamp(min=1).to(h.dtype)
        return total / count[:, None]
    if how not in ("cls", "last"):
        raise ValueError(how)
    nxt = torch.full_like(s, -1)
    nxt[:-1] = s[1:]
    prev = torch.full_like(s, -1)
    prev[1:] = s[:-1]
    # one token per text: where its index starts (cls) or ends (last); a text never spans rows, so
    # the flattened rows' seams are text boundaries too
    at = (s >= 0) & ((prev != s) if how == "cls" else (nxt != s))  # [R*T]
    out = torch.empty((n, d), dtype=h.dtype, device=h.device)
    out[s[at]] = h[at]
    return out


class Spans(NamedTuple):
    """A packed chunk's texts (and rows' padding tails) grouped by length, computed once per forward."""
    groups: list[torch.Tensor]  # for each length L, shortest first: [n, L] token positions in the flattened rows
    order: torch.Tensor  # [R*T]: the groups' positions concatenated, where their outputs go back


def spans(seg: torch.Tensor) -> Spans:
    """seg [R, T] -> Spans: a span starts at each row's first token and wherever seg changes (a
    text never crosses rows); within a length, spans keep row-then-position order."""
    rows, width = seg.shape
    start = torch.ones_like(seg, dtype=torch.bool)  # [R, T]
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = start.reshape(-1).nonzero().squeeze(1)  # [S] flat positions
    lengths = torch.diff(starts, append=starts.new_tensor([rows * width]))  # [S]
    lengths, by_length = lengths.sort(stable=True)
    sizes, counts = torch.unique_consecutive(lengths, return_counts=True)
    groups = [first[:, None] + torch.arange(size, device=seg.device)
              for first, size in zip(starts[by_length].split(counts.tolist()), sizes.tolist())]
    return Spans(groups, torch.cat([g.reshape(-1) for g in groups]))


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      segments: Spans | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query, key, value [R, H, T, d] -> ([R, T, H, d], None): each text of each row attending to itself
    alone (bidirectional), the texts of one length in one sdpa call (`segments`: spans(seg)). The
    padding tails attend to themselves and are never pooled."""
    if segments is None or attention_mask is not None:
        raise ValueError("segment_attention needs segments=packing.spans(seg) and no attention mask")
    rows, heads, width, d = query.shape
    flat = [t.transpose(1, 2).reshape(rows * width, heads, d) for t in (query, key, value)]  # [R*T, H, d]
    attend = functools.partial(_attend, module, dropout, scaling, kwargs)
    # With dropout, CPU's sdpa runs its math path, which keeps the [n, H, L, L] scores, probabilities and
    # dropout mask for the backward: sum L^2 per chunk, which a token budget does not bound (a chunk of
    # 256-token paragraphs kept 14x the scores of one of 12-token sentences, ~300 MiB for MiniLM).
    # Recomputed in the backward instead (checkpoint; its saved RNG state replays the same dropout), a
    # group keeps only its q, k, v: O(tokens), as flash attention does on a GPU.
    keep_scores = not (torch.is_grad_enabled() and query.requires_grad)
    parts = []
    for index in segments.groups:  # [n, L]
        group = [t[index].transpose(1, 2) for t in flat]  # [n, H, L, d] each
        parts.append(attend(*group) if keep_scores else checkpoint(attend, *group, use_reentrant=False))
    out = torch.empty_like(flat[0])  # [R*T, H, d]: every position lies in exactly one span
    out[segments.order] = torch.cat([p.reshape(-1, heads, d) for p in parts])
    return out.reshape(rows, width, heads, d), None


def _attend(module: torch.nn.Module, dropout: float, scaling: float | None, kwargs: dict, query: torch.Tensor,
            key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Texts of one length: [n, H, L, d] each -> [n, L, H, d]."""
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)[0]


def _no_mask(*args, **kwargs) -> None:
    """The mask transformers would build for SEGMENTS: none, the texts' spans say it all."""
    return None


AttentionInterface.register(SEGMENTS, segment_attention)
AttentionMaskInterface.register(SEGMENTS, _no_mask)


@contextlib.contextmanager
def attention(config, kernel: str) -> Iterator[None]:
    """The model's attention implementation set to `kernel` for one forward, then put back (never saved)."""
    before = config._attn_implementation_internal
    config._attn_implementation_internal = kernel
    try:
        yield
    finally:
        config._attn_implementation_internal = before
