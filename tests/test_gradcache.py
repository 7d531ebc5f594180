"""Gradient caching equals the uncached gradient: dropout off, dropout on (replayed), and
across accumulated batches. References are computed independently of contrastive_step."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    LOSS,
    grads,
    max_rel_diff,
    plain_engine,
    reference_grads,
    replayed_and_reference_grads,
    scored_triples,
    snli_batch,
    snli_source,
)

from train import gradcache
from train.data import read_source
from train.gradcache import contrastive_step, plan_chunks
from train.losses import EmbeddingLoss


def cached_grads(encoder, batch, chunk_size, loss_fn=LOSS, **kw):
    engine = plain_engine(encoder)
    encoder.zero_grad(set_to_none=True)
    stats = contrastive_step(engine, batch, loss_fn, chunk_size, **kw)
    return stats, grads(encoder)


@pytest.mark.parametrize("chunk_size", [3, 16, 32])
def test_cached_equals_full_batch_without_dropout(tiny_encoder_factory, chunk_size):
    encoder = tiny_encoder_factory().eval()
    batch = snli_batch(encoder, range(32))
    ref_loss, ref = reference_grads(encoder, batch)
    stats, got = cached_grads(encoder, batch, chunk_size)
    assert stats.chunks == -(-32 // chunk_size)
    assert abs(stats.loss - ref_loss) < 1e-5
    assert max_rel_diff(got, ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [4, 32])
def test_loss_in_blocks_of_rows_equals_the_whole(tiny_encoder_factory, monkeypatch, chunk_size):
    encoder = tiny_encoder_factory().eval()
    batch = snli_batch(encoder, range(32))
    ref_loss, ref = reference_grads(encoder, batch)
    monkeypatch.setattr(gradcache, "BLOCK_ELEMENTS", 5 * 64)  # 64 passage columns: blocks of 5 rows
    stats, got = cached_grads(encoder, batch, chunk_size)
    assert abs(stats.loss - ref_loss) < 1e-5
    assert max_rel_diff(got, ref) < 1e-5


def test_float64_weights_keep_float64_through_the_cache_and_the_loss():
    """model.dtype=float64: the cached embeddings, the loss and the gradients stay float64, so the
    cached gradient equals the float64 full batch to float64 rounding (float32 anywhere: ~1e-7)."""
    from train import assets
    from train.model import load_encoder

    encoder = load_encoder(str(assets.path("tiny-bert")), pooling="mean", max_length=32, dtype="float64").eval()
    batch = snli_batch(encoder, range(16))
    ref_loss, ref = reference_grads(encoder, batch)
    stats, got = cached_grads(encoder, batch, 4)
    assert {g.dtype for g in got.values()} == {torch.float64}
    assert abs(stats.loss - ref_loss) < 1e-12 * abs(ref_loss)
    assert max_rel_diff(got, ref) < 1e-12


def test_dropout_is_replayed_exactly(tiny_encoder_factory):
    encoder = tiny_encoder_factory().train()  # dropout 0.1 on: SimCSE's augmentation
    assert encoder.backbone.config.hidden_dropout_prob > 0
    got, ref = replayed_and_reference_grads(encoder, 24, chunk_size=4, seed=123)
    assert max_rel_diff(got, ref) < 1e-5
    batch = snli_batch(encoder, range(24))

    # Negative control: without restoring the RNG the replayed dropout masks differ.
    torch.manual_seed(123)
    original = gradcache.set_rng_state
    gradcache.set_rng_state = lambda state, device: None
    try:
        _, broken = cached_grads(encoder, batch, chunk_size=4)
    finally:
        gradcache.set_rng_state = original
    assert max_rel_diff(broken, ref) > 1e-2


def test_accumulated_batches_sum_exactly(tiny_encoder_factory):
    encoder = tiny_encoder_factory().eval()
    source = snli_source(32)
    first, second = snli_batch(encoder, range(16), source), snli_batch(encoder, range(16, 32), source)
    _, g1 = reference_grads(encoder, first)
    _, g2 = reference_grads(encoder, second)
    engine = plain_engine(encoder)
    encoder.zero_grad(set_to_none=True)
    contrastive_step(engine, first, LOSS, 5, scale=0.5, reduce=False)
    contrastive_step(engine, second, LOSS, 5, scale=0.5, reduce=True)
    assert max_rel_diff(grads(encoder), {k: (g1[k] + g2[k]) / 2 for k in g1}) < 1e-5


def test_length_grouping_pads_less_and_changes_nothing(tiny_encoder_factory):
    encoder = tiny_encoder_factory().eval()
    batch = snli_batch(encoder, range(32))
    grouped, g_grouped = cached_grads(encoder, batch, 4, group_by_length=True)
    plain, g_plain = cached_grads(encoder, batch, 4, group_by_length=False)
    real = grouped.real_tokens
    assert real == plain.real_tokens
    assert grouped.padded_tokens - real < 0.6 * (plain.padded_tokens - real)  # padding waste
    assert max_rel_diff(g_grouped, g_plain) < 1e-5


def test_plan_chunks_covers_every_text_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    chunks = plan_chunks(lengths, 3)
    assert sorted(i for c in chunks for i in c) == list(range(7))
    assert [[lengths[i] for i in c] for c in chunks] == [[9, 7, 5], [3, 3, 2], [1]]  # longest first
    assert plan_chunks(lengths, 3, by_length=False) == [[0, 1, 2], [3, 4, 5], [6]]


def test_plan_chunks_by_token_budget_holds_the_budget_and_every_text_once():
    lengths = [5, 1, 9, 3, 3, 7, 2, 30]
    chunks = plan_chunks(lengths, 100, max_tokens=20)
    assert sorted(i for c in chunks for i in c) == list(range(8))
    # by hand, longest first: 30 alone (over budget: a chunk of its own), 9+7 (2 x 9 = 18; a third
    # would pad to 27), 5+3+3 (3 x 5 = 15; a fourth: 20, fits), then 2+1
    assert [[lengths[i] for i in c] for c in chunks] == [[30], [9, 7], [5, 3, 3, 2], [1]]
    assert all(len(c) * max(lengths[i] for i in c) <= 20 for c in chunks if len(c) > 1)
    assert plan_chunks(lengths, 2, max_tokens=1000) == plan_chunks(lengths, 2)  # the count still bounds
    unordered = plan_chunks(lengths, 100, by_length=False, max_tokens=20)  # padded to each chunk's longest
    assert [i for c in unordered for i in c] == list(range(8))
    assert all(len(c) * max(lengths[i] for i in c) <= 20 for c in unordered if len(c) > 1)


def test_a_token_budget_gives_the_full_batch_gradient_with_chunks_sized_by_length(tiny_encoder_factory):
    """Heavy-tailed lengths: the cache cut by tokens equals plain autograd on the same chunks, and no
    chunk exceeds the budget, where a count of examples would put long texts together."""
    encoder = tiny_encoder_factory().eval()
    batch = snli_batch(encoder, range(24))
    seqs = batch.query_ids + batch.passage_ids
    budget = 4 * max(len(s) for s in seqs)
    chunks = plan_chunks([len(s) for s in seqs], 10**6, max_tokens=budget)
    ref_loss, ref = reference_grads(encoder, batch, chunks)
    stats, got = cached_grads(encoder, batch, len(batch), chunk_tokens=budget)
    assert stats.chunks == len(chunks) > 2 and stats.largest_chunk <= budget
    assert abs(stats.loss - ref_loss) < 1e-5
    assert max_rel_diff(got, ref) < 1e-5


@pytest.mark.parametrize("block_rows", [None, 5])
def test_cached_equals_full_batch_for_distillation_and_matryoshka(tiny_encoder_factory, tmp_path, monkeypatch,
                                                                  block_rows):
    """The E5 fine-tuning loss (InfoNCE + KL to teacher scores) on Matryoshka prefixes, through
    the cache, against plain autograd on the same chunks kept in one graph. block_rows=5: the loss in
    blocks of 5 query rows, all reading the prefixes loss_backward re-normalised once."""
    if block_rows:
        monkeypatch.setattr(gradcache, "BLOCK_ELEMENTS", block_rows * 48)  # 48 passage columns
    encoder = tiny_encoder_factory().eval()
    batch = snli_batch(encoder, range(24), read_source("scored", scored_triples(tmp_path / "scored.jsonl", 24)))
    assert batch.teacher is not None and batch.teacher.shape == (24, 2)
    dims = [encoder.dim, encoder.dim // 2, encoder.dim // 4]
    loss_fn = EmbeddingLoss(temperature=0.05, infonce_weight=0.2, distill_weight=1.0, teacher_temperature=0.5,
                            matryoshka_dims=dims)
    # The reference pads the same chunks as the cache does: with the gradients of the two terms
    # partly cancelling, padding a text to another length alone moves them by ~3e-5 relative.
    seqs = batch.query_ids + batch.passage_ids
    chunks = plan_chunks([len(s) for s in seqs], 5 * (1 + batch.group))
    ref_loss, ref = reference_grads(encoder, batch, chunks, loss_fn=loss_fn)
    stats, got = cached_grads(encoder, batch, 5, loss_fn=loss_fn)
    assert stats.chunks == 5
    assert abs(stats.loss - ref_loss) < 1e-5
    assert max_rel_diff(got, ref) < 1e-5


def test_a_token_budget_under_sharded_parameters_is_refused(compose):
    """FSDP2 and ZeRO gather parameters in every forward: ranks with different chunk counts (a token
    budget follows each rank's lengths) would wait in different collectives."""
    from train.build import check_chunk_tokens
    from train.errors import UserError

    t = compose(["trainer.chunk_tokens=512"]).trainer
    for strategy in ("fsdp2", "deepspeed"):
        with pytest.raises(UserError, match=f"trainer.chunk_tokens=512 with dist.strategy={strategy}.*chunk_size"):
            check_chunk_tokens(t, 128, strategy)
    check_chunk_tokens(t, 128, "ddp")
    check_chunk_tokens(t, 128, "single")
