"""Encoder: pooling by hand, save -> sentence-transformers / AutoModel load -> same embeddings."""

from __future__ import annotations

import json

import pytest
import torch

from train.embed import encode
from train.errors import UserError
from train.model import load_encoder, pad, pool, read_st_config


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding: the last token is still the last column
    assert torch.equal(pool(hidden, left, "last"), hidden[:, 2])


def test_pad_left_and_right():
    ids, mask = pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = pad([[5, 6], [7]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_saved_model_loads_everywhere_with_the_same_embeddings(tiny_encoder_factory, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    encoder = tiny_encoder_factory(pooling=pooling).eval()
    encoder.spec.prompts = {"query": "query: ", "passage": "passage: "}
    texts = ["A man plays a guitar.", "Two dogs run through the snow after a red ball."]
    ours_q = encode(encoder, texts, "query")
    ours_p = encode(encoder, texts, "passage")
    folder = encoder.save(tmp_path / "model")

    st = SentenceTransformer(str(folder), device="cpu")
    assert torch.allclose(st.encode_query(texts, convert_to_tensor=True), ours_q, atol=1e-5)
    assert torch.allclose(st.encode(texts, prompt_name="passage", convert_to_tensor=True), ours_p, atol=1e-5)
    assert AutoModel.from_pretrained(folder).config.hidden_size == encoder.dim

    again = load_encoder(str(folder)).eval()
    assert again.spec == encoder.spec  # pooling, normalisation, length and prompts travel with it
    assert torch.allclose(encode(again, texts, "query"), ours_q, atol=1e-6)


def test_matryoshka_prefix_loads_truncated_here_and_in_sentence_transformers(tiny_encoder_factory, tmp_path):
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    encoder = tiny_encoder_factory().eval()
    texts = ["A man plays a guitar.", "Two dogs run through the snow after a red ball."]
    full = encode(encoder, texts, None)  # [2, 32]
    folder = encoder.save(tmp_path / "model")

    short = load_encoder(str(folder), truncate_dim=8).eval()
    assert short.dim == 8
    ours = encode(short, texts, None)  # [2, 8]: the prefix, re-normalised
    assert torch.allclose(ours, F.normalize(full[:, :8], dim=-1), atol=1e-6)
    st = SentenceTransformer(str(folder), device="cpu", truncate_dim=8)
    theirs = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert theirs.shape == (2, 8) and torch.allclose(theirs, ours, atol=1e-5)

    saved = short.save(tmp_path / "short")  # a truncated model stays truncated, in both
    assert load_encoder(str(saved)).dim == 8
    assert SentenceTransformer(str(saved), device="cpu").encode(texts).shape == (2, 8)
    with pytest.raises(UserError, match="model.truncate_dim=64: expected 1 .. 32"):
        load_encoder(str(folder), truncate_dim=64)


def test_a_run_dir_stands_for_its_model(tiny_encoder_factory, tmp_path):
    tiny_encoder_factory().save(tmp_path / "run" / "model")
    assert load_encoder(str(tmp_path / "run")).dim == 32


def test_explicit_config_overrides_the_folder(tiny_encoder_factory, tmp_path):
    folder = tiny_encoder_factory(pooling="cls").save(tmp_path / "m")
    assert read_st_config(folder)["pooling"] == "cls"
    assert load_encoder(str(folder), pooling="mean", prompts={}).spec.pooling == "mean"


def test_save_is_atomic_and_replaces_only_when_complete(tiny_encoder_factory, tmp_path, monkeypatch):
    encoder = tiny_encoder_factory()
    out = encoder.save(tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(type(encoder.tokenizer), "save_pretrained", crash)
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        encoder.save(tmp_path / "model")
    assert (out / "model.safetensors").read_bytes() == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-written folder left


def test_unknown_local_path_and_offline_hub_name(monkeypatch):
    with pytest.raises(UserError, match="no such model folder"):
        load_encoder("./does/not/exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local folder, and the Hugging Face Hub could not provide it"):
        load_encoder("some-org/some-model-that-is-not-cached")


def test_st_config_written_in_the_long_standing_layout(tiny_encoder_factory, tmp_path):
    folder = tiny_encoder_factory(pooling="last").save(tmp_path / "m")
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                            "sentence_transformers.models.Pooling",
                                            "sentence_transformers.models.Normalize"]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]


# --- SimCSE's MLP head ------------------------------------------------------------------------------


def _no_dropout(encoder):
    for m in encoder.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return encoder


def _cls_by_hand(encoder, texts):
    """The backbone's [CLS] vectors, computed apart from the encoder's pooling and head."""
    ids, mask = pad(encoder.tokenize(texts), encoder.pad_id)
    with torch.no_grad():
        return encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


def test_kept_mlp_head_is_a_dense_module_that_loads_everywhere(tiny_encoder_factory, tmp_path):
    """Supervised SimCSE: [CLS] -> dense + tanh at test time too; saved as a sentence-transformers
    Dense module between pooling and normalisation, read back by our loader and by theirs."""
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    encoder = tiny_encoder_factory(pooling="cls", head="mlp").eval()
    texts = ["A man plays a guitar.", "Two dogs run through the snow after a red ball."]
    w, b = encoder.mlp[0].weight.detach(), encoder.mlp[0].bias.detach()
    assert w.shape == (32, 32) and float(w.std()) == pytest.approx(0.02, rel=0.2) and not b.any()  # BERT's init
    with torch.no_grad():
        encoder.mlp[0].bias.uniform_(-0.1, 0.1)  # a trained head has a bias; a zero one would hide a lost bias
    b = encoder.mlp[0].bias.detach().clone()
    by_hand = F.normalize(torch.tanh(_cls_by_hand(encoder, texts) @ w.T + b), dim=-1)
    ours = encode(encoder, texts, None)
    assert torch.allclose(ours, by_hand, atol=1e-6)

    folder = encoder.save(tmp_path / "model")
    modules = json.loads((folder / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[1]) for m in modules] == [
        ("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Normalize", "Normalize")]
    st = SentenceTransformer(str(folder), device="cpu")
    assert torch.allclose(st.encode(texts, convert_to_tensor=True), ours, atol=1e-5)
    again = load_encoder(str(folder)).eval()
    assert again.spec.head == "mlp" and torch.allclose(encode(again, texts, None), ours, atol=1e-6)


def test_training_only_mlp_head_is_left_out_of_the_saved_model(tiny_encoder_factory, tmp_path):
    """Unsupervised SimCSE, "w/ MLP (train)": the head shapes training, the test-time embedding is
    the plain [CLS]; the saved model has no head at all."""
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    encoder = _no_dropout(tiny_encoder_factory(pooling="cls", head="mlp_train"))
    texts = ["A man plays a guitar.", "Two dogs run through the snow after a red ball."]
    cls = _cls_by_hand(encoder, texts)
    w, b = encoder.mlp[0].weight.detach(), encoder.mlp[0].bias.detach()
    ids, mask = pad(encoder.tokenize(texts), encoder.pad_id)
    with torch.no_grad():
        trained = encoder.train()(ids, mask)
        tested = encoder.eval()(ids, mask)
    assert torch.allclose(trained, F.normalize(torch.tanh(cls @ w.T + b), dim=-1), atol=1e-6)
    assert torch.allclose(tested, F.normalize(cls, dim=-1), atol=1e-6)

    folder = encoder.save(tmp_path / "model")
    assert not (folder / "2_Dense").exists()
    assert [m["path"] for m in json.loads((folder / "modules.json").read_text())] == ["", "1_Pooling", "2_Normalize"]
    assert torch.allclose(SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True),
                          tested, atol=1e-5)
    again = load_encoder(str(folder))
    assert again.spec.head == "none" and again.mlp is None


def test_a_dense_module_we_cannot_compute_is_refused(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    from train import assets

    st = SentenceTransformer(modules=[Transformer(str(assets.path("tiny-bert"))), Pooling(32, "mean"),
                                      Dense(32, 16), Normalize()], device="cpu")
    st.save(str(tmp_path / "st"))
    with pytest.raises(UserError, match=r"2_Dense/config.json: a Dense module 32 -> 16 .* expected SimCSE's head"):
        load_encoder(str(tmp_path / "st"))


def test_float64_training_weights_are_saved_in_float32(tmp_path):
    """model.dtype=float64 is a training precision: the folder holds float32 weights and says so in
    config.json, and loads (as the default float32) to the float64 weights rounded once."""
    from safetensors.torch import load_file

    from train import assets

    encoder = load_encoder(str(assets.path("tiny-bert")), pooling="mean", max_length=32, dtype="float64")
    assert {p.dtype for p in encoder.parameters()} == {torch.float64}
    ids, mask = pad(encoder.tokenize(["a probe text"]), encoder.pad_id)
    assert encoder.eval()(ids, mask).dtype == torch.float64  # not cut to float32 on the way to the loss
    folder = encoder.save(tmp_path / "model")
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float32}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    again = dict(load_encoder(str(folder)).named_parameters())
    assert all(torch.equal(again[n], p.detach().float()) for n, p in encoder.named_parameters())


def test_float64_is_refused_where_it_cannot_hold(compose):
    from train.build import check_float64

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    check_float64(compose(["model=tiny_bert", "model.dtype=float64", "dist=fsdp2"]), cpu)
    for overrides, device, why in ((["dist=ddp"], cuda, "on CUDA"), (["trainer.precision=bf16"], cpu, "bfloat16"),
                                   (["dist=deepspeed_zero2"], cpu, "DeepSpeed")):
        cfg = compose(["model=tiny_bert", "model.dtype=float64", *overrides])
        with pytest.raises(UserError, match=f"^model.dtype=float64 .*{why}.*expected model.dtype=float32"):
            check_float64(cfg, device)
