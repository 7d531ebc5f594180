"""Embedding texts outside the training step: one function for evaluation (during and after
training), mining, the bi-encoder teacher, the merge search and inference.

`embedder(encoder, world, batch_size)` returns `embed(texts, side, instruction=None, max_length=None)
-> [N, D]` (float32, CPU); `max_length` cuts these texts instead of model.max_length (a task of long
documents is evaluated at the model's inference length, not at the training cut). Its work is
shared by all ranks: texts are sorted by length and dealt round-robin, so every rank gets similar
lengths and the same number of batches (sharded models need every rank in every forward), then
gathered back in order. Each distinct (prompt, length, text) is embedded once per embedder: tasks
built from one test set share most texts (SNLI's STS pairs and retrieval corpus are the same
sentences). `encode(encoder, texts, side)` is the one-process shorthand for inference.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from train import dist
from train.model import Encoder, pad

Embed = Callable[..., torch.Tensor]  # (texts, side, instruction=None, max_length=None) -> [N, D]


def embedder(encoder: Encoder, world: dist.World | None = None, batch_size: int = 128,
             forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Embed:
    """`forward(ids, mask)`: what runs the model (a training engine's wrapped module); default the
    encoder itself on `world.device`."""
    world = world or dist.World()
    forward = forward or encoder
    cache: dict[tuple[str, int | None, str], torch.Tensor] = {}  # (prompt, max_length, text)

    @torch.no_grad()
    def embed_new(texts: list[str], side: str | None, instruction: str | None, max_length: int | None) -> torch.Tensor:
        kw = {k: v for k, v in (("instruction", instruction), ("max_length", max_length)) if v}
        ids = encoder.tokenize(texts, side, **kw)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        per = math.ceil(len(ids) / world.size)
        # Fewer texts than ranks leaves some ranks none; they embed the first text as filler, since
        # every rank must run the same forwards and the gather (its rows are never read).
        mine = order[world.rank :: world.size] or order[:1]
        mine += mine[-1:] * (per - len(mine))  # equal shares: repeat the last text

        def forward_mine() -> torch.Tensor:
            return torch.cat([forward(*(t.to(world.device) for t in pad([ids[i] for i in mine[s : s + batch_size]],
                                                                        encoder.pad_id, encoder.left_pad)))
                              for s in range(0, per, batch_size)])

        # A rank failing here alone would leave the others in the gather: agree first, name the rank.
        local = dist.agree(world, forward_mine, f"embedding {len(ids)} texts")
        local = local.float().to(world.device)  # [per, D]
        gathered = dist.gather(local, world).cpu()  # [W*per, D]; this world's ranks, not the group's
        out = torch.empty((len(ids), gathered.shape[1]))
        for r in range(world.size):
            idx = order[r :: world.size]
            out[idx] = gathered[r * per : r * per + len(idx)]
        return out

    def embed(texts: Sequence[str], side: str | None, instruction: str | None = None,
              max_length: int | None = None) -> torch.Tensor:
        prompt = encoder.prefix(side, instruction)
        new = list(dict.fromkeys(t for t in texts if (prompt, max_length, t) not in cache))
        if new:
            for t, e in zip(new, embed_new(new, side, instruction, max_length)):
                cache[(prompt, max_length, t)] = e
        return (torch.stack([cache[(prompt, max_length, t)] for t in texts]) if texts
                else torch.empty((0, encoder.dim)))

    return embed


def encode(encoder: Encoder, texts: Sequence[str], side: str | None, batch_size: int = 128,
           device: torch.device | str = "cpu", instruction: str | None = None) -> torch.Tensor:
    """Embed texts in this process, for inference: [N, D] float32 on the CPU."""
    return embedder(encoder, dist.World(device=torch.device(device)), batch_size)(texts, side, instruction)
