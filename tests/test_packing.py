"""Packed forwards (train/packing.py) compute what padded ones do: embeddings equal the padded
forward's (dropout off), gradients through the cache equal plain autograd on the padded full batch
(dropout off) and on the same packed chunks (dropout on, replayed)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import LOSS, grads, max_rel_diff, plain_engine, reference_grads, snli_batch, tiny_lora_encoder

from train import assets, packing
from train.build import use_packing
from train.data import collate, read_source
from train.dist import World
from train.errors import UserError
from train.gradcache import contrastive_step, make_pairing
from train.model import load_encoder, pad


def packed_and_padded(encoder, seqs, row: int):
    """(packed embeddings put back in text order, padded embeddings), both [N, D], no grad."""
    rows = packing.plan_rows([len(s) for s in seqs], row)
    order = torch.tensor([i for r in rows for i in r])
    with torch.no_grad():
        out = encoder(*packing.pack(seqs, rows, encoder.pad_id))
        ref = encoder(*pad(seqs, encoder.pad_id, encoder.left_pad))
    got = torch.empty_like(out)
    got[order] = out
    return got, ref, rows


def test_plan_rows_holds_every_text_once_within_the_row():
    lengths = [5, 1, 9, 3, 3, 7, 2, 30]
    rows = packing.plan_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    # by hand, first fit over 30, 9, 7, 5, 3, 3, 2, 1 into rows of 10: 30 alone (longer than a row),
    # 9+1, 7+3, 5+3+2
    assert [[lengths[i] for i in r] for r in rows] == [[30], [9, 1], [7, 3], [5, 3, 2]]
    chunks = packing.plan_chunks(lengths, per_chunk=3, row=10, max_tokens=20)
    assert [r for c in chunks for r in c] == rows  # rows in order, each in one chunk
    assert [[[lengths[i] for i in r] for r in c] for c in chunks] == [[[30]], [[9, 1]], [[7, 3]], [[5, 3, 2]]]
    wide = packing.plan_chunks(lengths, per_chunk=100, row=10, max_tokens=20)  # two rows of 10 per chunk
    assert [[[lengths[i] for i in r] for r in c] for c in wide] == [[[30]], [[9, 1], [7, 3]], [[5, 3, 2]]]


def test_pack_lays_texts_end_to_end_with_positions_restarting():
    seqs = [[11, 12, 13], [21], [31, 32]]
    ids, mask, seg = packing.pack(seqs, [[0, 1], [2]], pad_id=0)
    assert ids.tolist() == [[11, 12, 13, 21], [31, 32, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert seg.tolist() == [[0, 0, 0, 1], [2, 2, -1, -1]]
    assert packing.positions(seg).tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    causal = packing.block_mask(seg, causal=True, kernel="sdpa", dtype=torch.float32)[0, 0].int().tolist()
    assert causal == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]


@pytest.mark.parametrize("name,kw", [
    ("tiny-bert", {"pooling": "mean"}),
    ("tiny-bert", {"pooling": "cls", "attn_implementation": "eager"}),
    ("minilm", {"pooling": "mean"}),
    ("tiny-llama", {"pooling": "last"}),
    ("tiny-llama", {"pooling": "mean", "bidirectional": True}),
    ("tiny-llama", {"pooling": "echo", "attn_implementation": "eager"}),
])
def test_packed_embeddings_equal_the_padded_forward(name, kw, monkeypatch):
    monkeypatch.setattr(packing, "SEGMENT_ROWS", 0)  # sdpa encoders attend text by text at any width
    encoder = load_encoder(str(assets.path(name)), max_length=32, **kw).eval()
    kernel = encoder.backbone.config._attn_implementation
    seqs = (lambda b: b.query_ids + b.passage_ids)(snli_batch(encoder, range(8)))
    got, ref, rows = packed_and_padded(encoder, seqs, row=128)
    assert encoder.backbone.config._attn_implementation == kernel  # text-by-text attention was for that forward
    assert len(rows) < len(seqs) // 2  # several texts share a row: the test exercises the packing
    assert float((got - ref).abs().max()) < 1e-5


def test_packed_embeddings_equal_the_padded_forward_with_lora_and_an_instruction():
    encoder = tiny_lora_encoder(pooling="mean").eval()
    encoder.spec.pool_prompt = False  # the instruction's tokens are context: attended, not pooled
    q = encoder.tokenize(["a man rides a horse", "two dogs play"], "query", instruction="Find the answer")
    assert all(s.context > 0 for s in q)
    seqs = q + encoder.tokenize(["a person is outdoors", "animals", "nothing at all here"], "passage")
    got, ref, _ = packed_and_padded(encoder, seqs, row=64)
    assert float((got - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("chunk_size,chunk_tokens,row_tokens", [(32, None, None), (3, None, None), (32, 160, None),
                                                                (32, 160, 64)])
def test_packed_cache_gives_the_padded_full_batch_gradient(tiny_encoder_factory, chunk_size, chunk_tokens,
                                                           row_tokens, monkeypatch):
    # text by text at every width but the last case's 64-token rows, where the block mask is used
    monkeypatch.setattr(packing, "SEGMENT_ROWS", 0 if row_tokens is None else 1000)
    encoder = tiny_encoder_factory().eval()
    batch = snli_batch(encoder, range(32))
    ref_loss, ref = reference_grads(encoder, batch)  # padded, one forward, plain autograd
    encoder.zero_grad(set_to_none=True)
    stats = contrastive_step(plain_engine(encoder), batch, LOSS, chunk_size, packed=True, chunk_tokens=chunk_tokens,
                             row_tokens=row_tokens)  # 64: the trainer's max_length rows under a budget
    assert stats.chunks > 1 or chunk_size == 32 and chunk_tokens is None
    assert stats.largest_chunk <= (chunk_tokens or 10**9)
    assert abs(stats.loss - ref_loss) < 1e-5
    assert max_rel_diff(grads(encoder), ref) < 1e-5


def test_packed_cache_gives_the_padded_gradient_for_a_lora_decoder():
    encoder = tiny_lora_encoder(pooling="last").eval()
    batch = snli_batch(encoder, range(12))
    ref_loss, ref = reference_grads(encoder, batch)
    encoder.zero_grad(set_to_none=True)
    stats = contrastive_step(plain_engine(encoder), batch, LOSS, 2, packed=True)
    assert stats.chunks > 1
    assert abs(stats.loss - ref_loss) < 1e-5
    assert max_rel_diff(grads(encoder), ref) < 1e-5
    assert all("lora" in k for k in ref)  # only the adapter trains


@pytest.mark.parametrize("segment_rows", [0, 1000])  # text by text; the block mask
def test_packed_dropout_is_replayed_exactly(tiny_encoder_factory, monkeypatch, segment_rows):
    """Dropout on: the cache equals plain autograd on the same packed chunks from the same seed
    (packed and padded masks differ by layout, so the reference is packed too)."""
    monkeypatch.setattr(packing, "SEGMENT_ROWS", segment_rows)
    encoder = tiny_encoder_factory().train()
    assert encoder.backbone.config.hidden_dropout_prob > 0
    batch = snli_batch(encoder, range(24))
    seqs = batch.query_ids + batch.passage_ids
    plans = packing.plan_chunks([len(s) for s in seqs], 4 * 3, encoder.spec.max_length)
    assert len(plans) > 1
    torch.manual_seed(7)
    encoder.zero_grad(set_to_none=True)
    emb = torch.empty((len(seqs), encoder.dim))
    order = torch.tensor([i for rows in plans for r in rows for i in r])
    emb = emb.index_put((order,), torch.cat([encoder(*packing.pack(seqs, rows, encoder.pad_id)) for rows in plans]))
    LOSS(make_pairing(emb[:24], emb[24:], batch, True, World())).backward()
    ref = grads(encoder)
    torch.manual_seed(7)
    encoder.zero_grad(set_to_none=True)
    contrastive_step(plain_engine(encoder), batch, LOSS, 4, packed=True)
    assert max_rel_diff(grads(encoder), ref) < 1e-5
    torch.manual_seed(8)  # control: other dropout masks give another gradient
    encoder.zero_grad(set_to_none=True)
    contrastive_step(plain_engine(encoder), batch, LOSS, 4, packed=True)
    assert max_rel_diff(grads(encoder), ref) > 1e-2


def test_packing_computes_few_padding_tokens_on_short_and_long_texts(tiny_encoder_factory):
    """The padded / real token ratio per step (the issue's goal: at most 1.10); SNLI triples at 64
    tokens and Wikipedia (title, paragraph) pairs at 256."""
    for source, max_length in ((read_source("snli", str(assets.path("snli") / "train_triples.jsonl"), limit=128), 64),
                               (read_source("wiki", str(assets.path("wiki") / "title_passage.jsonl"), limit=128), 256)):
        encoder = tiny_encoder_factory(max_length=max_length).eval()
        batch = collate([source], [(0, r) for r in range(128)], encoder.tokenize)
        seqs = batch.query_ids + batch.passage_ids
        plans = packing.plan_chunks([len(s) for s in seqs], 32 * (1 + batch.group), max_length, 32 * max_length)
        processed = sum(packing.pack(seqs, rows, encoder.pad_id)[0].numel() for rows in plans)
        real = sum(len(s) for s in seqs)
        assert max(len(s) for s in seqs) > max_length // 2  # long texts present: not a trivially short case
        assert processed / real <= 1.10, (source.name, processed / real)


def test_text_by_text_attention_equals_each_text_alone_and_recomputes_the_same_dropout():
    """segment_attention: each text (grouped by length) attends to itself alone, as sdpa on that text
    by itself does; and it keeps no [L, L] scores for the backward (checkpoint), so the recomputation
    must draw the dropout masks the forward drew: values and gradients equal attention kept whole."""
    torch.manual_seed(0)
    qkv = [torch.randn(2, 4, 12, 8, requires_grad=True) for _ in range(3)]  # [R, H, T, d]
    seg = torch.tensor([[0] * 5 + [1] * 7, [2] * 5 + [3] * 4 + [-1] * 3])  # texts of 5, 7, 5, 4; a tail of 3
    segments = packing.spans(seg)
    assert [tuple(i.shape) for i in segments.groups] == [(1, 3), (1, 4), (2, 5), (1, 7)]
    assert [i.tolist() for i in segments.groups] == [[[21, 22, 23]], [[17, 18, 19, 20]],
                                                     [list(range(5)), list(range(12, 17))], [list(range(5, 12))]]
    alone = torch.zeros(2, 12, 4, 8)  # each span through sdpa by itself, no dropout
    for r, row in enumerate(([(0, 5), (5, 12)], [(0, 5), (5, 9), (9, 12)])):
        for a, b in row:
            alone[r, a:b] = packing._attend(torch.nn.Module(), 0.0, None, {}, *(t[r : r + 1, :, a:b] for t in qkv))[0]
    got = packing.segment_attention(torch.nn.Module(), *qkv, None, dropout=0.0, segments=segments)[0]
    assert float((got - alone).detach().abs().max()) < 1e-6
    weight = torch.randn(2, 12, 4, 8)

    def run(kept: bool):
        torch.manual_seed(1)
        for t in qkv:
            t.grad = None
        with torch.no_grad() if kept else contextlib.nullcontext():  # no_grad: scores kept, no checkpoint
            out = packing.segment_attention(torch.nn.Module(), *qkv, None, dropout=0.5, segments=segments)[0]
        if kept:  # the same calls again, now with their graph kept whole, to take the gradient
            torch.manual_seed(1)
            flat = [t.transpose(1, 2).reshape(24, 4, 8) for t in qkv]
            parts = [packing._attend(torch.nn.Module(), 0.5, None, {}, *(t[i].transpose(1, 2) for t in flat))
                     for i in segments.groups]
            whole = torch.zeros(24, 4, 8).index_put((torch.cat([i.reshape(-1) for i in segments.groups]),),
                                                     torch.cat([p.reshape(-1, 4, 8) for p in parts]))
            assert torch.equal(whole.reshape(2, 12, 4, 8), out)
            out = whole.reshape(2, 12, 4, 8)
        (out * weight).sum().backward()
        return out.detach(), [t.grad.clone() for t in qkv]

    (out, grads), (ref, ref_grads) = run(False), run(True)
    assert torch.equal(out, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert not torch.equal(out, got)  # dropout is on


def test_under_a_token_budget_short_and_long_texts_cost_the_same_attention(tiny_encoder_factory):
    """With trainer.chunk_tokens the packed rows are model.max_length long (packing.row_tokens), so the
    largest chunk of short SNLI texts and of long Wikipedia paragraphs costs the same tokens and the same
    block-masked attention (rows x width^2): memory follows the budget, not the lengths. Rows as long as
    the longest text (no budget) would give the short texts a fraction of the long ones' attention."""
    max_length, budget = 256, 2048

    def largest_chunk(source, row):  # (tokens, attention elements per head) of the costliest chunk
        encoder = tiny_encoder_factory(max_length=max_length).eval()
        batch = collate([source], [(0, r) for r in range(64)], encoder.tokenize)
        seqs = batch.query_ids + batch.passage_ids
        row = row or max(len(s) for s in seqs)
        shapes = [packing.pack(seqs, rows, encoder.pad_id)[0].shape
                  for rows in packing.plan_chunks([len(s) for s in seqs], 10**6, row, budget)]
        return max(r * w for r, w in shapes), max(r * w * w for r, w in shapes)

    short = read_source("snli", str(assets.path("snli") / "train_triples.jsonl"), limit=64)
    long = read_source("wiki", str(assets.path("wiki") / "title_passage.jsonl"), limit=64)
    row = packing.row_tokens(max_length, budget)
    assert row == max_length and packing.row_tokens(max_length, None) is None
    (short_tokens, short_attn), (long_tokens, long_attn) = largest_chunk(short, row), largest_chunk(long, row)
    assert budget / 1.2 <= short_tokens <= budget and budget / 1.2 <= long_tokens <= budget
    assert long_attn / short_attn <= 1.2
    _, short_attn_longest = largest_chunk(short, None)  # the rule without a budget: rows of the longest text
    assert long_attn / short_attn_longest > 2


def test_packing_on_is_refused_where_it_has_no_form_and_auto_falls_back(compose, tiny_encoder_factory):
    latent = tiny_encoder_factory(pooling="latent", latents=8, latent_heads=2)
    with pytest.raises(UserError, match="trainer.packing=on: model.pooling=latent"):
        use_packing(compose(["trainer.packing=on"]).trainer, latent, torch.device("cpu"))
    assert not use_packing(compose([]).trainer, latent, torch.device("cpu"))
    plain = tiny_encoder_factory()
    assert use_packing(compose([]).trainer, plain, torch.device("cpu"))  # measured faster on CPU
    assert not use_packing(compose([]).trainer, plain, torch.device("cuda"))  # sdpa on CUDA: padded
    assert not use_packing(compose(["trainer.packing=off"]).trainer, plain, torch.device("cpu"))
    for strategy in ("fsdp2", "deepspeed"):  # sharded: ranks must run as many forwards
        assert not use_packing(compose([]).trainer, plain, torch.device("cpu"), strategy)
        with pytest.raises(UserError, match=f"dist.strategy={strategy}"):
            use_packing(compose(["trainer.packing=on"]).trainer, plain, torch.device("cpu"), strategy)
    decoder = tiny_lora_encoder()
    assert not use_packing(compose([]).trainer, decoder, torch.device("cpu"))  # unmeasured: padded
    assert use_packing(compose(["trainer.packing=on"]).trainer, decoder, torch.device("cpu"))
