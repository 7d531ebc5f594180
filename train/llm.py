"""Decoder LLMs as embedders: what a causal language model needs to give one vector per text.

- Special tokens: a decoder tokenizer often lacks a pad token (pad = EOS then) or, rarely, an
  EOS (EOS = pad then); both are set once and said once.
- Positions: counted from each text's first real token, so left and right padding give the
  same embedding (a decoder's default positions count the padding too).
- Bidirectional attention (NV-Embed arXiv 2405.17428, LLM2Vec arXiv 2404.05961): the causal
  mask is replaced through the model's own attention-mask interface. transformers' masking
  utilities build a bidirectional padding mask in the form the configured attention kernel
  expects (`masking_utils.create_bidirectional_mask`), and a decoder uses a ready 4D mask as
  given; no model class is replaced or patched.
- Pooling beyond model.py's mean/cls/last: latent attention (NV-Embed) and echo (Springer et
  al., arXiv 2402.15449: the text twice, pooled over the second copy, whose tokens have seen
  the whole text even under causal attention).

Token sequences carry how many leading tokens are context only (an instruction left out of
mean pooling, echo's first copy): `Tokens.context`; `model.pad` turns it into mask value 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.errors import UserError


class Tokens(list):
    """Token ids of one text; the first `context` of them are attended to but not pooled."""

    __slots__ = ("context",)

    def __init__(self, ids=(), context: int = 0):
        super().__init__(ids)
        self.context = context


def is_decoder(backbone: nn.Module) -> bool:
    """A causal model: its attention modules say `is_causal` (Llama, Mistral, Qwen2, Gemma: True;
    BERT-style encoders: False)."""
    return any(getattr(m, "is_causal", None) is True for m in backbone.modules())


def fix_special_tokens(tokenizer, where: str) -> list[str]:
    """Set a missing pad token from EOS, or a missing EOS from pad; say what was done."""
    said = []
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
        said.append(f"{where}: the tokenizer has no pad token; using its EOS {tokenizer.eos_token!r} to pad "
                    "(padded positions are masked, so the choice does not change embeddings)")
    if tokenizer.eos_token_id is None and tokenizer.pad_token_id is not None:
        tokenizer.eos_token = tokenizer.pad_token
        said.append(f"{where}: the tokenizer has no EOS token; appending its pad token {tokenizer.pad_token!r} "
                    "as the end-of-text token for last-token pooling")
    if tokenizer.pad_token_id is None:
        raise UserError(f"{where}: the tokenizer has neither a pad nor an EOS token; set `eos_token` in its "
                        "tokenizer_config.json (a decoder embedder appends it and pools there)")
    return said


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts in front of a text, ids it puts after): BOS for Llama-2 style
    tokenizers, [CLS] ... [SEP] for BERT, nothing for SmolLM2 or Qwen2."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    return full[:start], full[start + len(plain):]


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """attn [N, L] (1 real, 0 pad) -> [N, L]: 0, 1, 2, ... from each text's first real token."""
    return (attn.long().cumsum(1) - 1).clamp(min=0)


def check_bidirectional(backbone: nn.Module) -> None:
    impl = backbone.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise UserError(f"model.bidirectional=true works with model.attn_implementation=sdpa or eager (a 4D mask "
                        f"replaces the causal one); {impl} is not supported for it")


def bidirectional_mask(backbone: nn.Module, embeds: torch.Tensor, attn: torch.Tensor):
    """The 4D mask in which every token sees every real token of its text, in the form the
    model's attention implementation takes (bool for sdpa, additive float for eager). Always
    materialised: a missing mask would let sdpa fall back to the module's causal flag."""
    from transformers.masking_utils import create_bidirectional_mask

    check_bidirectional(backbone)
    return create_bidirectional_mask(config=backbone.config, inputs_embeds=embeds, attention_mask=attn,
                                     allow_is_bidirectional_skip=False)


def decoder_hidden(backbone: nn.Module, ids: torch.Tensor, attn: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """ids, attn [N, L] -> last hidden states [N, L, D] of a decoder."""
    pos = position_ids(attn)
    if not bidirectional:
        return backbone(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
    embeds = backbone.get_input_embeddings()(ids)  # [N, L, D]
    mask = bidirectional_mask(backbone, embeds, attn)  # [N, 1, L, L]
    return backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state


def masked_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, D], keep [N, L] bool -> [N, D]; positions not kept never enter the sum
    (`where`, not a product: a padded position's state may be anything, even NaN)."""
    m = keep.unsqueeze(-1)  # [N, L, 1]
    total = torch.where(m, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
    return total / m.sum(1).clamp(min=1).to(hidden.dtype)


class LatentAttention(nn.Module):
    """NV-Embed's latent-attention pooling (Lee et al., arXiv 2405.17428, section 3.2): the
    hidden states are queries that cross-attend to a trainable latent array (keys = values),
    an MLP with GELU follows, then mean pooling. The paper uses 512 latents and 8 heads."""

    def __init__(self, dim: int, latents: int = 512, heads: int = 8):
        super().__init__()
        if dim % heads:
            raise UserError(f"model.latent_heads={heads} does not divide the model's dimension {dim}")
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(latents, dim) * dim**-0.5)  # [r, D]
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # hidden [N, L, D], keep [N, L] -> [N, D]
        n, length, d = hidden.shape
        h, dh = self.heads, d // self.heads
        x = hidden.to(self.q.weight.dtype)
        q = self.q(x).view(n, length, h, dh).transpose(1, 2)  # [N, H, L, dh]
        k, v = self.kv(self.latents).view(-1, 2, h, dh).permute(1, 2, 0, 3)  # each [H, r, dh]
        out = F.scaled_dot_product_attention(q, k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))  # [N, H, L, dh]
        out = self.mlp(out.transpose(1, 2).reshape(n, length, d))  # [N, L, D]
        return masked_mean(out, keep)
