"""Contrastive losses: pure functions over embeddings.

Nothing here knows about processes or chunks. The engine (gradcache.py with dist.py)
hands over a `Pairing`: the local queries, every passage of the global batch (gathered
from all ranks, the local slot carrying gradient), each local query's positive column
and the false-negative mask. Layout of the passages, per example and in rank order:

    p_all = [pos_0, neg_0_1 .. neg_0_n, pos_1, neg_1_1, ..., pos_{W*B-1}, ...]  # [W*B*(1+n), D]

so the positive of global example g sits in column g * (1 + n): no per-rank offsets
to get wrong (the label misalignment of sentence-transformers PR #3453 cannot happen).

The contract of a loss: `loss(pair)` is a mean over the pairing's query rows. The engine
may then evaluate it on blocks of rows (`pair.rows(start, stop)`) and add the parts up,
so the [b, W*b*(1+n)] score matrix never has to exist at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass
class Pairing:
    q: torch.Tensor  # [b, D] this rank's queries (or a block of them)
    q_all: torch.Tensor  # [W*B, D] all queries (for the passage -> query direction)
    p_all: torch.Tensor  # [W*B*(1+n), D] all passages, example-major as above
    row0: int  # global index of q's first row
    group: int  # 1 + n: passages per example
    anchor_ids: torch.Tensor | None = None  # [W*B] hashes of all query texts: false negatives
    passage_ids: torch.Tensor | None = None  # [W*B*(1+n)] hashes of all passage texts
    teacher: torch.Tensor | None = None  # [b, 1+n] teacher scores of each example's passages

    @property
    def labels(self) -> torch.Tensor:  # [b] column of each local query's positive
        return (self.row0 + torch.arange(self.q.shape[0], device=self.q.device)) * self.group

    @functools.cached_property
    def masks(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask [b, P], q_mask [b, W*B]): True where a candidate is a false negative."""
        if self.anchor_ids is None or self.passage_ids is None:
            return None, None
        return false_negative_masks(self.anchor_ids, self.passage_ids, self.row0, self.q.shape[0], self.group)

    def rows(self, start: int, stop: int) -> Pairing:
        """The same pairing for query rows [start, stop) only."""
        teacher = self.teacher[start:stop] if self.teacher is not None else None
        return replace(self, q=self.q[start:stop], row0=self.row0 + start, teacher=teacher)


def info_nce(q: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, temperature: float,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE (van den Oord et al. 2018): cross-entropy of each row's positive among its columns.

    q [b, D], p [P, D], labels [b] in [0, P), mask [b, P] True = drop that column for that row.
    """
    logits = q @ p.T / temperature  # [b, P]
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, labels)


def contrastive_loss(pair: Pairing, temperature: float = 0.05, symmetric: bool = False) -> torch.Tensor:
    """Query -> passage InfoNCE over in-batch and hard negatives, optionally averaged with the
    passage -> query direction (positives only as rows, all queries as columns)."""
    labels = pair.labels
    mask, q_mask = pair.masks
    loss = info_nce(pair.q, pair.p_all, labels, temperature, mask)
    if symmetric:
        rows = pair.row0 + torch.arange(pair.q.shape[0], device=pair.q.device)  # [b]
        back = info_nce(pair.p_all[labels], pair.q_all, rows, temperature, q_mask)
        loss = (loss + back) / 2
    return loss


def false_negative_masks(anchor_all: torch.Tensor, passage_all: torch.Tensor, row0: int, b: int,
                         group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of in-batch candidates that are really positives, from text hashes.

    anchor_all [W*b] hashes of every query text, passage_all [W*b*group] of every passage.
    For query i a column is masked when its text equals i's positive, or when it is the
    positive of another copy of the same query (SNLI premises come with several
    entailments; each is right for both copies). i's own positive is never masked.
    Returns (mask [b, W*b*group], q_mask [b, W*b]).
    """
    dev = anchor_all.device
    rows = row0 + torch.arange(b, device=dev)  # [b] global example index
    labels = rows * group  # [b]
    n_cols = passage_all.shape[0]
    owner = torch.arange(n_cols, device=dev) // group  # [P] example owning each column
    is_pos = torch.arange(n_cols, device=dev) % group == 0  # [P]
    my_pos = passage_all[labels]  # [b]
    my_anchor = anchor_all[rows]  # [b]
    mask = passage_all[None, :] == my_pos[:, None]  # [b, P] same text as my positive
    mask |= (anchor_all[owner][None, :] == my_anchor[:, None]) & is_pos[None, :]
    mask[torch.arange(b, device=dev), labels] = False

    pos_all = passage_all[::group]  # [W*b] every example's positive
    q_mask = (anchor_all[None, :] == my_anchor[:, None]) | (pos_all[None, :] == my_pos[:, None])  # [b, W*b]
    q_mask[torch.arange(b, device=dev), rows] = False
    return mask, q_mask
