"""Exact top-k search with bounded memory, shared by evaluation and hard-negative mining."""

from __future__ import annotations

import torch


@torch.no_grad()
def topk(queries: torch.Tensor, docs: torch.Tensor, k: int, query_chunk: int = 1024,
         doc_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of inner products, never holding the full similarity matrix.

    queries [Q, D], docs [N, D] -> (scores [Q, k], indices [Q, k]), best first.
    Peak extra memory is O(query_chunk * (doc_chunk + k)): each block of scores is merged
    into a running top-k before the next block is computed.
    """
    k = min(k, docs.shape[0])
    out_s = torch.empty((queries.shape[0], k), dtype=torch.float32)
    out_i = torch.empty((queries.shape[0], k), dtype=torch.long)
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].float()
        best_s = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for d0 in range(0, docs.shape[0], doc_chunk):
            block = q @ docs[d0 : d0 + doc_chunk].float().T  # [q, d]
            s, i = block.topk(min(k, block.shape[1]), dim=1)
            cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + d0], 1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        out_s[q0 : q0 + q.shape[0]], out_i[q0 : q0 + q.shape[0]] = best_s, best_i
    return out_s, out_i
