"""Decoder LLMs as embedders (train/llm.py, model.py): pooling, padding, attention, instructions.

References are computed from the plain transformers model on one unpadded text at a time,
with positions and pooled spans worked out by hand, independently of Encoder.forward.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from train import assets, llm
from train.errors import UserError
from train.model import ECHO_SECOND, load_encoder, pad

TEXTS = ["a dog runs", "two people are sitting on a bench in the park", "rain"]


def tiny(**kw):
    torch.manual_seed(0)
    return load_encoder(str(assets.path("tiny-llama")), **{"max_length": 64, **kw}).eval()


def plain_hidden(encoder, ids: list[int]) -> torch.Tensor:
    """[L, D] hidden states of one unpadded sequence from the backbone's own forward."""
    with torch.no_grad():
        return encoder.backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("pooling", ["last", "mean", "latent", "echo"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_left_and_right_padding_equal_each_text_alone(pooling, bidirectional):
    encoder = tiny(pooling=pooling, bidirectional=bidirectional)
    ids = encoder.tokenize(TEXTS, "query")
    with torch.no_grad():
        alone = torch.cat([encoder(*pad([s], encoder.pad_id)) for s in ids])  # no padding at all
        right = encoder(*pad(ids, encoder.pad_id, left=False))
        left = encoder(*pad(ids, encoder.pad_id, left=True))
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)


def test_last_token_is_an_appended_eos_and_matches_the_plain_model():
    encoder = tiny(pooling="last", normalize=False)
    ids = encoder.tokenize(TEXTS, "query")
    assert all(s[-1] == encoder.tokenizer.eos_token_id for s in ids)
    # the saved tokenizer appends it itself, so sentence-transformers sees the same ids
    assert encoder.tokenizer(TEXTS[0])["input_ids"][-1] == encoder.tokenizer.eos_token_id
    with torch.no_grad():
        got = encoder(*pad(ids, encoder.pad_id, left=True))
    want = torch.stack([plain_hidden(encoder, s)[-1] for s in ids])
    assert torch.allclose(got, want, atol=1e-5)


def test_echo_pools_the_second_copy_only():
    encoder = tiny(pooling="echo", normalize=False)
    assert encoder.tokenize(["word " * 100])[0].context < 64  # truncated: each copy gets half the room
    ids = encoder.tokenize(TEXTS, "query")
    plain = [encoder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    sep = encoder.tokenizer(ECHO_SECOND, add_special_tokens=False)["input_ids"]
    for s, t in zip(ids, plain):  # ... first copy, separator | second copy (the only pooled tokens)
        assert list(s[s.context :]) == t
        assert list(s[s.context - len(sep) - len(t) : s.context]) == t + sep
    with torch.no_grad():
        got = encoder(*pad(ids, encoder.pad_id))
    want = torch.stack([plain_hidden(encoder, s)[-len(t):].mean(0) for s, t in zip(ids, plain)])
    assert torch.allclose(got, want, atol=1e-5)


def test_instruction_template_and_its_exclusion_from_mean_pooling():
    task = "Given a premise, retrieve a hypothesis"
    encoder = tiny(pooling="mean", normalize=False, pool_prompt=False)
    ids = encoder.tokenize(TEXTS, "query", instruction=task)
    assert encoder.tokenizer.decode(ids[0]) == f"Instruct: {task}\nQuery: {TEXTS[0]}"
    # "Query: " ends in a space that the tokenizer joins to the text's first word: the prompt
    # proper is the tokens before it, and the joined token (" a", " two", " rain") is pooled.
    prompt = encoder.tokenizer(f"Instruct: {task}\nQuery:", add_special_tokens=False)["input_ids"]
    assert all(list(s[: len(prompt)]) == prompt and s.context == len(prompt) for s in ids)
    with torch.no_grad():
        got = encoder(*pad(ids, encoder.pad_id, left=True))
        whole = encoder(*pad([list(s) for s in ids], encoder.pad_id))  # same ids, no context: prompt pooled
    want = torch.stack([plain_hidden(encoder, s)[len(prompt):].mean(0) for s in ids])
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - whole).abs().max() > 1e-3
    # passages get no instruction (E5-Mistral: query side only)
    assert encoder.tokenize(TEXTS[:1], "passage", instruction=task)[0] == encoder.tokenizer(TEXTS[0])["input_ids"]


def test_sentence_transformers_pools_the_same_tokens_without_the_prompt(tmp_path):
    from sentence_transformers import SentenceTransformer

    # a template ending in a newline: no token spans prompt and text (see Encoder.tokenize)
    encoder = tiny(pooling="mean", pool_prompt=False, instruction_template="Instruct: {task}\nQuery:\n")
    task = "Retrieve semantically similar text."
    want = torch.cat([encoder(*pad(encoder.tokenize([t], "query", instruction=task), encoder.pad_id))
                      for t in TEXTS]).detach()
    st = SentenceTransformer(str(encoder.save(tmp_path / "model")), device="cpu")
    got = torch.as_tensor(st.encode(TEXTS, prompt=encoder.prefix("query", task)))
    assert (got - want).abs().max() < 1e-5


def test_bidirectional_attention_lets_a_token_see_later_tokens():
    """Through the model's mask interface (sdpa and eager alike): with it, the first token's
    state depends on the last token; without it, it does not."""
    for impl in ("sdpa", "eager"):
        a = torch.tensor([[100, 200, 300, 400]])
        b = torch.tensor([[100, 200, 300, 999]])  # only the last token differs
        attn = torch.ones_like(a)
        for bidirectional in (False, True):
            encoder = tiny(pooling="mean", attn_implementation=impl, bidirectional=bidirectional)
            with torch.no_grad():
                ha = llm.decoder_hidden(encoder.backbone, a, attn, bidirectional)
                hb = llm.decoder_hidden(encoder.backbone, b, attn, bidirectional)
            first_changed = (ha[0, 0] - hb[0, 0]).abs().max().item()
            if bidirectional:
                assert first_changed > 1e-4, impl
            else:
                assert first_changed == 0.0, impl
                # and the causal path is the plain model's own forward
                assert torch.allclose(ha, plain_hidden(encoder, a[0].tolist())[None], atol=1e-6)


def test_latent_attention_equals_the_formula():
    torch.manual_seed(0)
    layer = llm.LatentAttention(dim=8, latents=5, heads=2).eval()
    hidden, keep = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    q = hidden @ layer.q.weight.T  # [N, L, D]
    kv = layer.latents @ layer.kv.weight.T  # [r, 2D]
    k, v = kv[:, :8], kv[:, 8:]
    outs = []
    for h in range(2):  # softmax(q k^T / sqrt(dh)) v per head, by hand
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[:, sl].T / 2.0, dim=-1)
        outs.append(w @ v[:, sl])
    out = layer.mlp(torch.cat(outs, -1))  # [N, L, D]
    want = torch.stack([out[i][keep[i]].mean(0) for i in range(2)])
    assert torch.allclose(layer(hidden, keep), want, atol=1e-6)


def test_missing_pad_token_is_set_from_eos_and_said(tmp_path):
    src = assets.path("tiny-llama")
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    AutoModel.from_pretrained(src).save_pretrained(tmp_path)
    encoder = load_encoder(str(tmp_path), pooling="last")
    assert encoder.pad_id == encoder.tokenizer.eos_token_id
    assert any("no pad token" in n for n in encoder.notes)


def test_tokenizer_without_pad_or_eos_is_refused():
    tok = AutoTokenizer.from_pretrained(assets.path("tiny-llama"))
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(UserError, match="neither a pad nor an EOS"):
        llm.fix_special_tokens(tok, "model")


def test_decoder_options_on_an_encoder_are_refused():
    with pytest.raises(UserError, match="decoder"):
        load_encoder(str(assets.path("tiny-bert")), bidirectional=True)
    with pytest.raises(UserError, match="decoder"):
        load_encoder(str(assets.path("tiny-bert")), pooling="echo")


def test_bidirectional_with_flash_attention_is_refused():
    encoder = tiny(pooling="last", bidirectional=True)
    encoder.backbone.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="sdpa or eager"):
        encoder(*pad(encoder.tokenize(TEXTS[:1]), encoder.pad_id))


def test_each_source_and_task_gets_its_own_instruction(tmp_path):
    from train.data import Source, collate
    from train.evaluate import RetrievalTask, StsTask

    encoder = tiny(pooling="last")
    a = Source("a", ["q1", "q2"], ["p1", "p2"], [], None, instruction="Task A")
    b = Source("b", ["q3"], ["p3"], [], None)  # no instruction: the plain query side
    batch = collate([a, b], [(0, 0), (1, 0), (0, 1)], encoder.tokenize)
    assert batch.query_ids == [encoder.tokenize(["q1"], "query", instruction="Task A")[0],
                               encoder.tokenize(["q3"], "query")[0],
                               encoder.tokenize(["q2"], "query", instruction="Task A")[0]]
    assert encoder.tokenizer.decode(batch.query_ids[0]).startswith("Instruct: Task A\nQuery: q1")
    assert batch.passage_ids[0] == encoder.tokenize(["p1"], "passage")[0]

    calls = []

    def embed(texts, side, instruction=None):
        calls.append((side, instruction))
        return torch.randn(len(texts), 4)

    (tmp_path / "sts.jsonl").write_text('{"sentence1": "x", "sentence2": "y", "score": 1}\n'
                                        '{"sentence1": "z", "sentence2": "w", "score": 0}\n')
    StsTask("sts", str(tmp_path / "sts.jsonl"), instruction="Sim")(embed)
    ir = tmp_path / "ir"
    ir.mkdir()
    (ir / "corpus.jsonl").write_text('{"id": "d", "text": "doc"}\n')
    (ir / "queries.jsonl").write_text('{"id": "q", "text": "query"}\n')
    (ir / "qrels.jsonl").write_text('{"query_id": "q", "doc_id": "d"}\n')
    RetrievalTask("ir", str(ir), k_values=(1,), instruction="Find")(embed)
    assert calls == [("query", "Sim"), ("query", "Find"), ("passage", None)]


def test_last_pooling_appends_the_eos_when_the_tokenizer_cannot(tmp_path):
    """A model folder whose tokenizer has no add_eos_token (a python-backend tokenizer, here
    Perceiver's byte tokenizer, which ends a text with [SEP]): load_encoder must detect it and
    append the EOS itself, and last-token pooling must pool that EOS."""
    from transformers import PerceiverTokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):  # the tiny Llama's weights; byte ids fit its vocabulary
        (folder / name).write_bytes((assets.path("tiny-llama") / name).read_bytes())
    PerceiverTokenizer(model_max_length=64).save_pretrained(folder)
    torch.manual_seed(0)
    encoder = load_encoder(str(folder), pooling="last", max_length=8, normalize=False).eval()
    tok, eos = encoder.tokenizer, encoder.tokenizer.eos_token_id
    assert not hasattr(tok, "add_eos_token") and tok("a dog")["input_ids"][-1] != eos  # it cannot
    ids = encoder.tokenize(TEXTS + [" word" * 50])
    assert all(seq[-1] == eos and len(seq) <= 8 for seq in ids)
    with torch.no_grad():
        got = encoder(*pad(ids, encoder.pad_id))
    want = torch.stack([plain_hidden(encoder, s)[-1] for s in ids])  # the hidden state at the EOS
    assert torch.allclose(got, want, atol=1e-5)
