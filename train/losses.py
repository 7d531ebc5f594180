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
    # Matryoshka: dim -> (q, q_all, p_all) cut to their first dim coordinates and re-normalised, made once
    # per step by the engine (gradcache.loss_backward) instead of once per block of query rows
    prefixes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

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
        prefixes = {d: (q[start:stop], q_all, p_all) for d, (q, q_all, p_all) in self.prefixes.items()} \
            if self.prefixes else None
        return replace(self, q=self.q[start:stop], row0=self.row0 + start, teacher=teacher, prefixes=prefixes)


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


def distill_loss(pair: Pairing, temperature: float = 0.05, teacher_temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over each query's own candidate list [positive, its hard negatives].

    E5 fine-tuning (arXiv 2212.03533, after RocketQAv2) distils a cross-encoder this way:
    the teacher's scores, softened by `teacher_temperature`, are a distribution over the
    1 + n candidates; the student's is the softmax of its cosines / `temperature`.
    """
    if pair.teacher is None:
        raise ValueError("distill_loss needs teacher scores in the batch")
    idx = pair.labels[:, None] + torch.arange(pair.group, device=pair.q.device)  # [b, 1+n] columns
    student = torch.einsum("bd,bgd->bg", pair.q, pair.p_all[idx]) / temperature  # [b, 1+n]
    target = F.log_softmax(pair.teacher.to(student.dtype) / teacher_temperature, dim=-1)  # [b, 1+n]
    return F.kl_div(F.log_softmax(student, dim=-1), target, log_target=True, reduction="batchmean")


def prefix(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x [N, D] -> [N, dim]: the first `dim` coordinates, re-normalised."""
    return F.normalize(x[:, :dim], dim=-1)


def truncated(pair: Pairing, dim: int) -> Pairing:
    """The pairing on the first `dim` coordinates, re-normalised (Matryoshka, arXiv 2205.13147):
    a prefix of the embedding must work as an embedding by itself. Taken from `pair.prefixes` when
    the engine made them already."""
    if pair.prefixes and dim in pair.prefixes:
        q, q_all, p_all = pair.prefixes[dim]
        return replace(pair, q=q, q_all=q_all, p_all=p_all, prefixes=None)
    return replace(pair, q=prefix(pair.q, dim), q_all=prefix(pair.q_all, dim), p_all=prefix(pair.p_all, dim),
                   prefixes=None)


@dataclass(frozen=True)
class EmbeddingLoss:
    """embedding_loss with its settings bound (build.loss: cfg.loss). Its `prefix_dims` tell the engine
    which Matryoshka prefixes to re-normalise once per step (gradcache.loss_backward)."""
    temperature: float = 0.05
    symmetric: bool = False
    infonce_weight: float = 1.0
    distill_weight: float = 0.0
    teacher_temperature: float = 1.0
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None

    @property
    def prefix_dims(self) -> list[int]:
        return list(self.matryoshka_dims or [])

    def __call__(self, pair: Pairing) -> torch.Tensor:
        return embedding_loss(pair, **vars(self))


def embedding_loss(pair: Pairing, temperature: float = 0.05, symmetric: bool = False,
                   infonce_weight: float = 1.0, distill_weight: float = 0.0, teacher_temperature: float = 1.0,
                   matryoshka_dims: list[int] | None = None,
                   matryoshka_weights: list[float] | None = None) -> torch.Tensor:
    """What the trainer optimises: weighted InfoNCE + distillation, at the full dimension or
    summed over Matryoshka prefixes. Still a mean over query rows, so the engine may take it
    a block of rows at a time, and still a function of the embeddings alone, so gradient
    caching applies unchanged (a Matryoshka loss needs no second graph, unlike ST #3107).

    E5 fine-tuning: infonce_weight 0.2, distill_weight 1.0.
    """
    dims = list(matryoshka_dims) if matryoshka_dims else [None]
    weights = list(matryoshka_weights) if matryoshka_weights else [1.0] * len(dims)
    total = pair.q.new_zeros(())
    for dim, weight in zip(dims, weights):
        p = pair if dim is None else truncated(pair, dim)
        part = p.q.new_zeros(())
        if infonce_weight:
            part = part + infonce_weight * contrastive_loss(p, temperature, symmetric)
        if distill_weight:
            part = part + distill_weight * distill_loss(p, temperature, teacher_temperature)
        total = total + weight * part
    return total


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


# --- re-ranker losses: over a cross-encoder's scores of each query's own passages -------------------


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each query's [positive, negatives...] (column 0 is the positive),
    mean over queries: the localized contrastive estimation of Gao, Dai & Callan (arXiv 2101.08751),
    the loss the mined groups are shaped for. scores: [b, 1+n] raw cross-encoder scores."""
    return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device))


def pointwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every (query, passage) pair: the positive labelled 1, each negative 0
    (monoBERT, Nogueira & Cho, arXiv 1901.04085), mean over queries of the mean over their pairs
    (equal groups: the mean over all pairs). scores: [b, 1+n] logits."""
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores, labels)


RERANK_LOSSES = {"listwise": listwise_loss, "pointwise": pointwise_loss}


def rerank_loss(scores: torch.Tensor, kind: str = "listwise") -> torch.Tensor:
    """A mean over the rows (queries) of `scores` [b, 1+n], so a batch may be scored in chunks."""
    return RERANK_LOSSES[kind](scores)
