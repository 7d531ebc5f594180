"""Small builders shared by tests (no fixtures: importable from spawned processes too)."""

from __future__ import annotations

import dataclasses
import functools
import json

import torch

from train import assets
from train.data import Source, collate, read_source
from train.dist import World
from train.engines import TorchEngine
from train.gradcache import make_pairing
from train.losses import contrastive_loss
from train.model import load_encoder, pad
from train.optim import param_groups

LOSS = functools.partial(contrastive_loss, temperature=0.05, symmetric=True)


def tiny_encoder():
    """The tiny BERT as the distributed worker builds it (mean pooling, 32 tokens), dropout off."""
    return load_encoder(str(assets.path("tiny-bert")), pooling="mean", max_length=32).eval()


LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def tiny_lora_encoder(pooling: str = "last", **lora):
    """The tiny Llama with a LoRA adapter whose B matrices are random (seeded): peft starts them
    at zero, where the merged model equals the base and A gets no gradient, so tests would pass
    for the wrong reason."""
    torch.manual_seed(0)
    encoder = load_encoder(str(assets.path("tiny-llama")), pooling=pooling, max_length=32,
                           lora_config={**LORA, **lora})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in encoder.backbone.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return encoder


def reference_grads(encoder, batch, chunks=None, loss_fn=LOSS, mask_duplicates: bool = True):
    """Full-batch gradient by plain autograd on one process: every chunk's graph kept, one
    backward. Independent of contrastive_step and of torch.distributed."""
    seqs = batch.query_ids + batch.passage_ids
    chunks = chunks or [list(range(len(seqs)))]
    encoder.zero_grad(set_to_none=True)
    parts = [encoder(*pad([seqs[i] for i in c], encoder.pad_id)) for c in chunks]
    emb = torch.empty((len(seqs), parts[0].shape[1]), dtype=parts[0].dtype)
    emb = emb.index_put((torch.tensor([i for c in chunks for i in c]),), torch.cat(parts))
    b = len(batch)
    loss = loss_fn(make_pairing(emb[:b], emb[b:], batch, mask_duplicates=mask_duplicates, world=World()))
    loss.backward()
    return float(loss.detach()), grads(encoder)


def replayed_and_reference_grads(encoder, n: int, chunk_size: int, seed: int):
    """(gradient-cached, reference) gradients of n SNLI examples with dropout on: the reference
    runs the same chunks from the same seed with every graph kept, so its dropout masks are the
    ones the cache must replay."""
    from train.gradcache import contrastive_step, plan_chunks

    batch = snli_batch(encoder, range(n))
    seqs = batch.query_ids + batch.passage_ids
    chunks = plan_chunks([len(s) for s in seqs], chunk_size * (1 + batch.group))
    torch.manual_seed(seed)
    _, ref = reference_grads(encoder, batch, chunks)
    torch.manual_seed(seed)
    encoder.zero_grad(set_to_none=True)
    contrastive_step(plain_engine(encoder), batch, LOSS, chunk_size)
    return grads(encoder), ref


def snli_source(n: int = 64, negatives: bool = True) -> Source:
    name = "train_triples.jsonl" if negatives else "train_pairs.jsonl"
    return read_source("snli", str(assets.path("snli") / name), limit=n)


def snli_source_with_cross_rank_duplicates(n: int, batch_size: int) -> Source:
    """n SNLI triples where, in every batch of `batch_size` rows, the second half (rank 1's slice
    at 2 ranks) repeats texts of the first half (rank 0's): a query with another positive, a
    positive, and a hard negative that is another example's positive. Only masks computed over
    the gathered batch catch these false negatives (losses.false_negative_masks)."""
    src, half = snli_source(n), batch_size // 2
    # the Arrow-backed columns are read-only: plain lists to plant the duplicates in
    src = dataclasses.replace(src, anchors=list(src.anchors), positives=list(src.positives),
                              negatives=[list(negs) for negs in src.negatives])
    for start in range(0, n, batch_size):
        src.anchors[start + half] = src.anchors[start]  # the same query on both ranks
        src.positives[start + half + 1] = src.positives[start + 1]  # the same positive on both
        src.negatives[start + half + 2][0] = src.positives[start + 2]  # rank 1's negative = rank 0's positive
    return src


def scored_triples(path, n: int = 64) -> str:
    """A file of the shape E5 fine-tuning reads: n SNLI triples with made-up (seeded) teacher scores."""
    src, g = snli_source(n), torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for a, p, negs in zip(src.anchors, src.positives, src.negatives):
            f.write(json.dumps({"query": a, "positive": p, "negatives": negs,
                                "scores": torch.randn(1 + len(negs), generator=g).tolist()}) + "\n")
    return str(path)


def snli_batch(encoder, rows: range, source: Source | None = None):
    source = source or snli_source(max(rows) + 1)
    return collate([source], [(0, r) for r in rows], encoder.tokenize)


def plain_engine(encoder, lr: float = 1e-3) -> TorchEngine:
    return TorchEngine(encoder, World(), lambda m: torch.optim.SGD(param_groups(m, 0.0), lr=lr),
                       lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), None, False)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor max|a - b| / max|b|. Tensors whose true gradient is 0 (attention key
    biases: softmax ignores them) hold only rounding noise, so the denominator has a floor of
    1e-4 times the largest gradient entry of the whole model."""
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])
    floor = 1e-4 * max(float(v.abs().max()) for v in b.values())
    return max(float((a[k] - b[k]).abs().max() / max(float(b[k].abs().max()), floor)) for k in a)


# --- cross-encoders (tests/test_rerank.py, tests/rerank_worker.py) ---------------------------------


def tiny_cross_encoder_folder(out) -> str:
    """The tiny BERT with a one-label head, saved as a CrossEncoder folder. The pooler and head are
    drawn (seeded) at a scale that spreads the scores: the random BERT's own (std 0.02) leave every
    score near one value, where a wrong segment id or a dropped pair would hardly show."""
    from train.cross_encoder import load_cross_encoder

    torch.manual_seed(0)
    ce = load_cross_encoder(str(assets.path("tiny-bert")), max_length=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, std in ((ce.backbone.bert.pooler.dense, 0.5), (ce.backbone.classifier, 1.0)):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    ce.save(out)
    return str(out)


def grouped_source(n: int = 32) -> Source:
    """n SNLI triples widened to 3 negatives each: the contradiction and the next two examples'
    positives (the grouped shape the mining job writes), as plain lists."""
    src = snli_source(n + 2)
    pos, negs = list(src.positives), list(src.negatives)
    return Source("grouped", list(src.anchors)[:n], pos[:n], [[negs[i][0], pos[i + 1], pos[i + 2]] for i in range(n)],
                  None, "snli triples")


def rerank_reference(cross_encoder, batches, loss_fn) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Mean over the batches of the full-batch loss on one process, by plain autograd (every pair
    of a batch in one forward, one backward): (each batch's loss, the gradient)."""
    cross_encoder.zero_grad(set_to_none=True)
    losses = []
    for batch in batches:
        scores = cross_encoder(*pad(batch.pair_ids, cross_encoder.pad_id)).view(len(batch), batch.group)
        loss = loss_fn(scores)
        (loss / len(batches)).backward()
        losses.append(float(loss.detach()))
    return losses, grads(cross_encoder)
