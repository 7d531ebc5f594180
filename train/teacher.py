"""Teacher scores for distillation: a stronger model rates (query, passage) pairs.

    score(teacher, queries, candidates) -> per query, one score per candidate, in their order

Two kinds of teacher, told apart by the folder's config.json:
  cross-encoder  `architectures` ends in ForSequenceClassification: transformers'
                 AutoModelForSequenceClassification reads query and passage together; the score
                 is the logit (one label) or logit[1] - logit[0] (two labels: the log-odds of
                 "relevant"). Slower, and the better judge of near-duplicates.
  bi-encoder     anything else: the project's load_encoder; the cosine of the query (query
                 prompt) and passage (passage prompt) embeddings.
Mining writes them as `scores` = [positive, negatives...], the field the trainer's
distillation loss reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from train.cross_encoder import is_cross_encoder, relevance
from train.embed import encode
from train.errors import UserError
from train.model import load_encoder
from train.st_folder import resolve_model_dir


def score(teacher: str, queries: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int = 32,
          max_length: int = 256, device: torch.device | str = "cpu") -> list[list[float]]:
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    folder = resolve_model_dir(teacher)
    pairs = [(q, p) for q, ps in zip(queries, candidates) for p in ps]
    if is_cross_encoder(folder):
        flat = cross_encoder_scores(folder, pairs, batch_size, max_length, device)
    else:
        flat = bi_encoder_scores(teacher, pairs, batch_size, device)
    out, at = [], 0
    for ps in candidates:
        out.append(flat[at : at + len(ps)].tolist())
        at += len(ps)
    return out


@torch.no_grad()
def cross_encoder_scores(folder: Path, pairs: Sequence[tuple[str, str]], batch_size: int, max_length: int,
                         device: torch.device | str) -> torch.Tensor:
    """[P] relevance of each (query, passage) pair."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"mine.teacher={folder}: could not load a cross-encoder: {str(e).splitlines()[0][:300]}") from e
    labels = model.config.num_labels
    if labels not in (1, 2):
        raise UserError(f"mine.teacher={folder}: a cross-encoder with {labels} labels; expected 1 (a relevance "
                        "logit) or 2 (not relevant, relevant)")
    # Longest first, so each batch pads to similar lengths (and memory trouble shows at once).
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    out = torch.empty(len(pairs))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt").to(device)
        logits = model(**enc).logits.float()  # [b, labels]
        out[idx] = relevance(logits).cpu()
    return out


@torch.no_grad()
def bi_encoder_scores(teacher: str, pairs: Sequence[tuple[str, str]], batch_size: int,
                      device: torch.device | str) -> torch.Tensor:
    """[P] cosine of each pair's query and passage embeddings, every distinct text embedded once."""
    encoder = load_encoder(teacher).to(device).eval()
    queries = list(dict.fromkeys(q for q, _ in pairs))
    passages = list(dict.fromkeys(p for _, p in pairs))
    qe = F.normalize(encode(encoder, queries, "query", batch_size, device), dim=-1)  # [Q, D]
    pe = F.normalize(encode(encoder, passages, "passage", batch_size, device), dim=-1)  # [P', D]
    qidx = {q: i for i, q in enumerate(queries)}
    pidx = {p: i for i, p in enumerate(passages)}
    qi = torch.tensor([qidx[q] for q, _ in pairs], dtype=torch.long)
    pi = torch.tensor([pidx[p] for _, p in pairs], dtype=torch.long)
    return (qe[qi] * pe[pi]).sum(-1)  # [P]
