"""LoRA through peft (train/lora.py): what trains, bad input, saving (merged = adapter model,
both reload; sentence-transformers loads the merged folder), gradient caching with LoRA
dropout replayed, gradient checkpointing, and 2 DDP ranks vs the 1-process full batch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    LORA,
    max_rel_diff,
    reference_grads,
    replayed_and_reference_grads,
    snli_batch,
    snli_source_with_cross_rank_duplicates,
    tiny_lora_encoder,
)

from train import assets, lora
from train.build import check_strategy
from train.embed import encode
from train.errors import UserError
from train.model import load_encoder

TEXTS = ["a dog runs across the field", "two people sit on a bench", "rain", "a man plays the guitar"]
MERGE_TOL = 1e-5  # merged vs adapter embeddings (unit vectors): float32 rounding of W + B A


def embed(encoder, texts=TEXTS, side="query"):
    return encode(encoder, texts, side)


def test_only_the_adapter_trains():
    encoder = tiny_lora_encoder()
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(LORA["target_modules"])  # ...q_proj.lora_A.default.weight
    n_trainable, n_total = lora.trainable_share(encoder)
    assert n_trainable == sum(p.numel() for n, p in encoder.named_parameters() if "lora_" in n) < n_total
    encoder.train()
    encoder(*encoder_pad(encoder, TEXTS)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in encoder.parameters())


def encoder_pad(encoder, texts):
    from train.model import pad

    return pad(encoder.tokenize(texts), encoder.pad_id)


def test_unknown_target_module_lists_the_candidates():
    with pytest.raises(UserError, match=r"qkv_proj not in this model.*gate_proj.*q_proj"):
        tiny_lora_encoder(target_modules=["q_proj", "qkv_proj"])


def test_qlora_is_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        load_encoder(str(assets.path("tiny-llama")), lora_config=LORA, quantization="4bit")


def test_lora_with_a_sharded_strategy_is_refused(compose):
    cfg = compose(["recipe=lora_llm", "data=lora_llm_offline", "dist=fsdp2"])
    with pytest.raises(UserError, match="model.lora with dist.strategy=fsdp2"):
        check_strategy(cfg)


@pytest.mark.parametrize("pooling", ["last", "latent"])
def test_merged_equals_adapter_model_and_both_reload(tmp_path, pooling):
    encoder = tiny_lora_encoder(pooling=pooling).eval()
    if encoder.latent is not None:  # trained latent weights must travel with the model
        torch.nn.init.normal_(encoder.latent.latents, std=1.0)
    want = embed(encoder)
    out = encoder.save(tmp_path / "model")

    merged = load_encoder(str(out)).eval()
    adapter = load_encoder(str(out / lora.ADAPTER_DIR)).eval()
    assert not lora.is_lora(merged.backbone) and lora.is_lora(adapter.backbone)
    assert (merged.spec.pooling, adapter.spec.pooling) == (pooling, pooling)
    assert (embed(merged) - want).abs().max() < MERGE_TOL
    assert (embed(adapter) - want).abs().max() < MERGE_TOL
    # Negative control: the base model alone is far from it (a merge that did nothing would pass
    # the checks above only if the adapter did nothing too).
    torch.manual_seed(0)
    base = load_encoder(str(assets.path("tiny-llama")), pooling=pooling, max_length=32).eval()
    if base.latent is not None:
        base.latent.load_state_dict(encoder.latent.state_dict())
    assert (embed(base) - want).abs().max() > 1e-2
    config = json.loads((out / lora.ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["r"] == LORA["r"] and sorted(config["target_modules"]) == sorted(LORA["target_modules"])


def test_sentence_transformers_loads_the_merged_model(tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = tiny_lora_encoder(pooling="last").eval()
    want = embed(encoder, side=None)
    out = encoder.save(tmp_path / "model")
    st = SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(st.encode(TEXTS, batch_size=2))
    assert (got - want).abs().max() < MERGE_TOL


@pytest.mark.parametrize("kw", [{"pooling": "latent"}, {"pooling": "echo"}, {"pooling": "last", "bidirectional": True}])
def test_sentence_transformers_refuses_what_it_would_compute_differently(tmp_path, kw):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    encoder = load_encoder(str(assets.path("tiny-llama")), max_length=32, **kw)
    out = encoder.save(tmp_path / "model")
    with pytest.raises(Exception, match="NeedsTrainLoader"):  # refused, naming the module class
        SentenceTransformer(str(out), device="cpu")
    with pytest.raises(Exception, match="load_encoder"):  # allowed to import it: told what to use
        SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert load_encoder(str(out)).spec.bidirectional == kw.get("bidirectional", False)


def test_gradient_cache_replays_lora_dropout_exactly():
    encoder = tiny_lora_encoder(dropout=0.3).train()
    got, ref = replayed_and_reference_grads(encoder, 12, chunk_size=4, seed=7)
    assert set(got) == set(ref) and all("lora_" in k for k in got)
    assert max_rel_diff(got, ref) < 1e-5
    _, other = replayed_and_reference_grads(encoder, 12, chunk_size=4, seed=8)
    assert max_rel_diff(other, ref) > 1e-3  # negative control: other dropout masks, another gradient


def test_gradient_checkpointing_replays_lora_dropout_through_the_cache():
    """A checkpointed layer runs its forward again inside backward. With LoRA dropout on and the
    gradient cache replaying every chunk, that second run must draw the first run's masks.
    Reference: the same model without checkpointing, every chunk's graph kept."""
    def layer_calls(encoder) -> list:
        calls = []
        encoder.backbone.base_model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        return calls

    plain = tiny_lora_encoder(dropout=0.3).train()
    plain_calls = layer_calls(plain)
    _, ref = replayed_and_reference_grads(plain, 12, chunk_size=4, seed=7)
    results = {}
    for preserve_rng in (True, False):  # False: the negative control, recomputed with other masks
        encoder = tiny_lora_encoder(dropout=0.3).train()
        lora.enable_checkpointing(encoder.backbone)
        if not preserve_rng:
            encoder.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
        calls = layer_calls(encoder)
        results[preserve_rng], _ = replayed_and_reference_grads(encoder, 12, chunk_size=4, seed=7)
        assert encoder.backbone.base_model.model.is_gradient_checkpointing
        assert len(calls) > len(plain_calls)  # the layers really ran again in backward
    assert set(results[True]) == set(ref) and all("lora_" in k for k in ref)
    assert max_rel_diff(results[True], ref) < 1e-5
    assert max_rel_diff(results[False], ref) > 1e-3


@pytest.fixture(scope="module")
def lora_ddp_runs(tmp_path_factory):
    from test_dist import torchrun

    out = tmp_path_factory.mktemp("lora_ddp")
    torchrun(out, "lora_uncached:ddp:0:16:8:1", "lora_cached:ddp:0:16:2:1")
    return out


@pytest.mark.parametrize("case", ["lora_uncached", "lora_cached"])
def test_ddp_with_lora_matches_the_full_batch(lora_ddp_runs, case):
    result = torch.load(lora_ddp_runs / f"{case}.pt")
    assert result["world_size"] == 2 and result["aligned"]
    encoder = tiny_lora_encoder().eval()
    source = snli_source_with_cross_rank_duplicates(16, 16)  # what the worker trains on
    loss, ref = reference_grads(encoder, snli_batch(encoder, range(16), source))
    assert set(result["grads"]) == set(ref) and all("lora_" in k for k in ref)
    assert result["losses"] == pytest.approx([loss], abs=1e-5)
    assert max_rel_diff(result["grads"], ref) < 2e-5
