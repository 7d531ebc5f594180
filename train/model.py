"""The encoder: any transformers AutoModel plus pooling, normalisation and prompts.

Saved as a sentence-transformers folder (train/st_folder.py), so pooling and prompts travel
with the model; loading reads them back, and a config value that is set explicitly overrides
what the folder says.

The encoder knows nothing of torch.distributed: the loop wraps it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from train import llm, lora, packing
from train.atomic import atomic_folder
from train.boundary import check_safetensors
from train.errors import UserError
from train.st_folder import (
    DENSE_DIR,
    HEADS,
    LATENT_FILE,
    POOLINGS,
    NeedsTrainLoader,
    float32_files,
    read_dense_head,
    read_st_config,
    resolve_model_dir,
    write_dense_head,
    write_st_config,
)

__all__ = ["NeedsTrainLoader"]  # named in the modules.json of folders saved before st_folder.py existed
DECODER_ONLY = ("echo",)
# Springer et al. (arXiv 2402.15449): "Rewrite the sentence: x, rewritten sentence: x"; the
# embedding is the mean over the second copy, whose tokens have all seen the whole text.
ECHO_FIRST, ECHO_SECOND = "Rewrite the sentence: ", "\nRewritten sentence: "
# E5-Mistral (arXiv 2401.00368): instructions on the query side only, in this template.
INSTRUCTION_TEMPLATE = "Instruct: {task}\nQuery: "
# float64: a CPU training precision for exactness checks (model.dtype in train/config.py); model/ is
# still saved in float32 (st_folder.float32_files, called by Encoder.save)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def embedding_dtype(emb: torch.Tensor) -> torch.Tensor:
    """Embeddings in float32 at least: bf16/fp16 forwards give float32 embeddings, so the loss and
    the gradient cache run in float32; float64 weights keep float64 through loss, cache and optimizer."""
    return emb if emb.dtype == torch.float64 else emb.float()


@dataclass
class EncoderSpec:
    """Everything besides the weights that decides an embedding; saved with the model."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 128
    prompts: dict[str, str] = field(default_factory=dict)  # side ("query", "passage") -> prefix
    truncate_dim: int | None = None  # keep the first N dimensions (Matryoshka), re-normalised
    bidirectional: bool = False  # decoders: every token attends to the whole text (NV-Embed, LLM2Vec)
    pool_prompt: bool = True  # false: prompt/instruction tokens are left out of mean pooling
    instruction_template: str = INSTRUCTION_TEMPLATE  # query-side prefix when a source/task has an instruction
    latents: int = 512  # latent attention (NV-Embed): size of the latent array ...
    latent_heads: int = 8  # ... and its heads
    # SimCSE (arXiv 2104.08821, Table 6, the pooling ablation): a dense layer + tanh over the pooled
    # vector. "mlp": at training and test time (supervised SimCSE), saved as a Dense module;
    # "mlp_train": in training only (unsupervised SimCSE, "w/ MLP (train)"), not saved.
    head: str = "none"
    # The saved model's max_seq_length: max_length cuts texts for training (SNLI sentences fit in 32),
    # while users of the saved model embed whole documents. None: max_length. Not compared: it
    # changes no embedding this spec computes, only what the saved folder says.
    save_max_length: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"model.pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.head not in HEADS:
            raise UserError(f"model.head={self.head!r}: expected one of {', '.join(HEADS)}")
        for key in ("max_length", "save_max_length"):
            if getattr(self, key) is not None and getattr(self, key) < 2:
                raise UserError(f"model.{key}={getattr(self, key)}: expected at least 2")
        if "{task}" not in self.instruction_template:
            raise UserError(f"model.instruction_template={self.instruction_template!r}: expected a {{task}} "
                            "placeholder for the instruction")

    @property
    def sentence_transformers_compatible(self) -> bool:
        """Whether sentence-transformers computes the same embedding from the saved folder."""
        return self.pooling not in ("latent", "echo") and not self.bidirectional


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [N, L, D], mask [N, L] as `pad` makes it (0 padding, 1 pooled, 2 context) -> [N, D]."""
    if how == "mean":
        return llm.masked_mean(hidden, mask == 1)  # context tokens (an instruction) are attended, not pooled
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        # Position of the last real token, right or left padding alike: argmax over
        # mask * position picks the highest attended index.  [N]
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = ((mask > 0) * pos).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(how)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [N, L], attention_mask [N, L]) padded to the longest.

    Mask values: 0 padding, 1 a pooled token, 2 context only (the first `Tokens.context` ids
    of a sequence: an instruction kept out of pooling, echo's first copy)."""
    n, length = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(seqs):
        start = length - len(s) if left else 0
        ids[i, start : start + len(s)] = torch.as_tensor(s)
        mask[i, start : start + len(s)] = 1
        mask[i, start : start + getattr(s, "context", 0)] = 2
    return ids, mask


class Padded:
    """What the padding code (pad(), packing.pack) reads of a model's tokenizer."""

    tokenizer: Any

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def left_pad(self) -> bool:
        return self.tokenizer.padding_side == "left"


class Encoder(Padded, nn.Module):
    """texts -> token ids (tokenize) -> [N, D] embeddings (forward)."""

    def __init__(self, backbone: nn.Module, tokenizer, spec: EncoderSpec):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        self.decoder = llm.is_decoder(backbone)
        self.notes: list[str] = []  # what was changed on the way in, said once by the caller
        if self.decoder:
            self.notes = llm.fix_special_tokens(tokenizer, "model")
            if spec.pooling == "last" and getattr(tokenizer, "add_eos_token", None) is False:
                # E5-Mistral pools the hidden state of an EOS appended to every text. Set on the
                # tokenizer itself, it is saved with it, so sentence-transformers appends it too.
                tokenizer.add_eos_token = True
                if hasattr(tokenizer, "update_post_processor"):
                    tokenizer.update_post_processor()
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; set one before training")
        if not self.decoder and (spec.pooling in DECODER_ONLY or spec.bidirectional):
            what = "model.bidirectional=true" if spec.bidirectional else f"model.pooling={spec.pooling}"
            raise UserError(f"{what} is for decoder (causal) models; this model's attention is bidirectional already")
        if spec.bidirectional:
            llm.check_bidirectional(backbone)
        self.head, self.tail = llm.special_ends(tokenizer)
        # A tokenizer that cannot append the EOS itself (no add_eos_token): tokenize() appends it.
        self.append_eos = self.decoder and spec.pooling == "last" and (
            not self.tail or self.tail[-1] != tokenizer.eos_token_id)
        full = int(self.backbone.config.hidden_size)
        if spec.truncate_dim is not None and not 0 < spec.truncate_dim <= full:
            raise UserError(f"model.truncate_dim={spec.truncate_dim}: expected 1 .. {full} (the model's dimension)")
        self.latent = llm.LatentAttention(full, spec.latents, spec.latent_heads) if spec.pooling == "latent" else None
        self._echo: tuple[list[int], list[int]] | None = None  # echo's fixed pieces, tokenized on first use
        self.mlp = None
        if spec.head != "none":
            # SimCSE's MLPLayer: Linear(D, D) + tanh, new weights drawn as BERT initialises a linear
            # layer (normal, std initializer_range; zero bias), not BERT's pretrained pooler.
            self.mlp = nn.Sequential(nn.Linear(full, full), nn.Tanh())
            nn.init.normal_(self.mlp[0].weight, std=float(getattr(backbone.config, "initializer_range", 0.02)))
            nn.init.zeros_(self.mlp[0].bias)

    @property
    def dim(self) -> int:
        return self.spec.truncate_dim or int(self.backbone.config.hidden_size)

    @property
    def positions(self) -> int:
        """The longest input the backbone takes (its position embeddings; BERT's 512)."""
        return int(getattr(self.backbone.config, "max_position_embeddings", 0) or 512)

    def prefix(self, side: str | None, instruction: str | None = None) -> str:
        """What goes in front of a text: the instruction template on the query side when the data
        source or evaluation task has an instruction, else the side's prompt."""
        if instruction and side == "query":
            return self.spec.instruction_template.format(task=instruction)
        return self.spec.prompts.get(side, "") if side else ""

    def tokenize(self, texts: Sequence[str], side: str | None = None,
                 instruction: str | None = None, max_length: int | None = None) -> list[list[int]]:
        """Prompted, truncated token ids, unpadded: padding is decided per chunk later. `max_length`:
        the cut for these texts (an evaluation task of long documents); None: model.max_length."""
        prefix = self.prefix(side, instruction)
        limit = min(max_length, self.positions) if max_length else self.spec.max_length
        if self.spec.pooling != "echo":
            texts = [prefix + t for t in texts] if prefix else list(texts)
            enc = self.tokenizer(texts, truncation=True, max_length=limit - self.append_eos)["input_ids"]
            if self.append_eos:
                enc = [[*ids, int(self.tokenizer.eos_token_id)] for ids in enc]
            if self.spec.pool_prompt or not prefix:
                return enc
            # The context is the leading tokens shared with the prompt tokenized alone: where the
            # prompt's last token merges with the text's first ("Query: " + "rain" -> "Query:",
            # " rain") the merged token is pooled. sentence-transformers' `include_prompt: false`
            # counts the prompt alone and drops it; with a prompt that ends in a newline or any
            # other boundary the tokenizer never merges across, the two pool the same tokens.
            alone = self.head + self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            return [llm.Tokens(ids, context=_shared_prefix(ids, alone)) for ids in enc]
        # Echo: pieces tokenized apart, so that the second copy is exactly the first:
        #   head + prefix + E1 + text + E2 | text + tail   (the context: all before the second copy)
        def ids(s: str) -> list[int]:
            return self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

        if self._echo is None:  # the fixed pieces, tokenized once
            self._echo = (ids(ECHO_FIRST), ids(ECHO_SECOND))
        first, second = self.head + ids(prefix) + self._echo[0], self._echo[1]
        room = (limit - len(first) - len(second) - len(self.tail)) // 2
        if room < 1:
            raise UserError(f"model.max_length={limit} leaves no room for text after the "
                            f"{len(first) + len(second)}-token echo prefix {prefix!r}")
        out = []
        for t in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            context = first + t[:room] + second
            out.append(llm.Tokens(context + t[:room] + self.tail, context=len(context)))
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                seg: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask: [N, L] -> [N, D]; mask 2 = attended, not pooled (see pad).
        # With seg (the packed layout of train/packing.py): [R, T] rows of several texts -> [N, D].
        attn = (attention_mask > 0).long()
        how = "mean" if self.spec.pooling == "echo" else self.spec.pooling  # echo: the mean over the second copy
        if seg is not None:
            emb = embedding_dtype(packing.pool(self._packed_hidden(input_ids, seg), attention_mask, seg, how))
        else:
            if self.decoder:
                hidden = llm.decoder_hidden(self.backbone, input_ids, attn, self.spec.bidirectional)
            else:
                hidden = self.backbone(input_ids=input_ids, attention_mask=attn).last_hidden_state
            if self.spec.pooling == "latent":
                emb = embedding_dtype(self.latent(hidden, attention_mask == 1))
            else:
                emb = embedding_dtype(pool(hidden, attention_mask, how))
        if self.mlp is not None and (self.spec.head == "mlp" or self.training):  # mlp_train: dropped in eval()
            emb = embedding_dtype(self.mlp(emb))
        if self.spec.truncate_dim:
            emb = emb[:, : self.spec.truncate_dim]  # normalised after the cut, as Matryoshka training saw it
        return F.normalize(emb, dim=-1) if self.spec.normalize else emb

    def packing_refusal(self) -> str | None:
        """Why this encoder cannot run packed forwards, or None when it can."""
        kernel = self.backbone.config._attn_implementation
        if self.spec.pooling == "latent":
            return "model.pooling=latent has no packed form here (its pooling runs on the padded layout)"
        if kernel not in packing.MASKED + packing.FLASH:
            return f"model.attn_implementation={kernel}: packing needs sdpa, eager or flash_attention_2"
        if kernel in packing.FLASH and self.spec.bidirectional:
            return "model.bidirectional=true needs a 4D mask, which flash attention does not take"
        return None

    def _packed_hidden(self, input_ids: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """Packed rows ids, seg [R, T] -> last hidden states [R, T, D], each text on its own."""
        kernel = self.backbone.config._attn_implementation
        pos = packing.positions(seg)  # [R, T]
        extra = {"use_cache": False} if self.decoder else {}
        if kernel in packing.FLASH:
            # One row: transformers' flash path reads the texts' boundaries from the restarting
            # positions and runs varlen attention (padding tokens are 1-token texts, never pooled).
            out = self.backbone(input_ids=input_ids.reshape(1, -1), position_ids=pos.reshape(1, -1), **extra)
            return out.last_hidden_state.reshape(*input_ids.shape, -1)
        if kernel == "sdpa" and not self.decoder and input_ids.device.type == "cpu" \
                and input_ids.shape[1] >= packing.SEGMENT_ROWS:
            # text by text: no [T, T] scores, mask or dropout draws; measured on CPU only (on a GPU the
            # loop's many small kernels would cost launches, and flash attention's varlen path is the way)
            with packing.attention(self.backbone.config, packing.SEGMENTS):
                return self.backbone(input_ids=input_ids, position_ids=pos,
                                     segments=packing.spans(seg)).last_hidden_state
        causal = self.decoder and not self.spec.bidirectional
        mask = packing.block_mask(seg, causal, kernel, self.backbone.dtype)  # [R, 1, T, T]
        return self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=pos, **extra).last_hidden_state

    # --- saving --------------------------------------------------------------------------------

    def save(self, out: str | Path, state_dict: dict | None = None, texts: dict[str, str] | None = None) -> Path:
        """Write a sentence-transformers folder atomically: a temp folder, then a rename.

        `state_dict` replaces the module's own (a consolidated FSDP/ZeRO-3 state dict); `texts`
        are more files of the folder (README.md: the model card), written inside the same rename.
        """
        adapter = lora.is_lora(self.backbone)  # build.check_strategy keeps these off sharded strategies
        with atomic_folder(out) as tmp:
            dim = int(self.backbone.config.hidden_size)  # pooling sees all dims
            folders = [tmp, tmp / lora.ADAPTER_DIR] if adapter else [tmp]
            with no_deepspeed_probe():
                if adapter:  # the merged model at the root, the adapter alone beside it
                    lora.save_backbone(self.backbone, tmp)
                else:
                    self.backbone.save_pretrained(tmp, state_dict=state_dict)
            for folder in folders:  # each folder loads on its own: tokenizer, pooling, latents
                self.tokenizer.save_pretrained(folder)
                write_st_config(folder, self.spec, dim)
                if self.mlp is not None and self.spec.head == "mlp":
                    write_dense_head(folder / DENSE_DIR, self.mlp[0])
                if self.latent is not None:
                    from safetensors.torch import save_file

                    save_file({k: v.detach().cpu().contiguous() for k, v in self.latent.state_dict().items()},
                              folder / LATENT_FILE)
            if any(p.dtype == torch.float64 for p in self.parameters()):
                float32_files(tmp)  # model.dtype=float64 trains in float64; the saved model is float32
            for name, text in (texts or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
        return Path(out)


@contextlib.contextmanager
def no_deepspeed_probe():
    """transformers' save_pretrained unwraps the model through accelerate, which imports deepspeed
    (when installed) only to ask whether the model is a DeepSpeedEngine; importing deepspeed picks
    an accelerator and, on a machine without one, prints a warning into every run. Nothing can be a
    DeepSpeedEngine before deepspeed is imported (a DeepSpeed strategy imports it), so until then
    accelerate is told it is absent for the length of the save."""
    try:
        from accelerate.utils import other
    except ImportError:  # no accelerate: transformers unwraps by itself, without deepspeed
        other = None
    if "deepspeed" in sys.modules or not hasattr(other, "is_deepspeed_available"):
        yield
        return
    probe = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        other.is_deepspeed_available = probe


def _shared_prefix(ids: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading ids equal the prompt's, leaving at least one token to pool."""
    n = 0
    while n < min(len(prompt), len(ids) - 1) and ids[n] == prompt[n]:
        n += 1
    return n


def load_encoder(path: str, pooling: str | None = None, normalize: bool | None = None,
                 max_length: int | None = None, prompts: dict[str, str] | None = None,
                 dtype: str = "float32", attn_implementation: str | None = None,
                 truncate_dim: int | None = None, *, bidirectional: bool | None = None,
                 pool_prompt: bool | None = None, instruction_template: str | None = None,
                 latents: int | None = None, latent_heads: int | None = None, lora_config: dict | None = None,
                 gradient_checkpointing: bool = False, quantization: str | None = None,
                 save_max_length: int | None = None, head: str | None = None) -> Encoder:
    """Load a model folder or hub name; explicit arguments override what the folder says.

    A folder with `adapter_config.json` (a saved `model/adapter`) loads its base model (the
    adapter's `base_model_name_or_path`) with the adapter on top. `lora_config` ({r, alpha,
    dropout, target_modules}) wraps the backbone in a fresh trainable LoRA adapter. The encoder
    saves `save_max_length` as its max_seq_length, else the folder's own, else `max_length`.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_model_dir(path)
    check_safetensors(folder, f"model.path={path}")  # a truncated copy, named before transformers trips on it
    saved = read_st_config(folder)
    given = {"pooling": pooling, "normalize": normalize, "max_length": max_length,
             "prompts": dict(prompts) if prompts is not None else None, "truncate_dim": truncate_dim,
             "bidirectional": bidirectional, "pool_prompt": pool_prompt,
             "instruction_template": instruction_template, "latents": latents, "latent_heads": latent_heads,
             "head": head}
    spec = EncoderSpec(**{k: v if v is not None else saved[k] for k, v in given.items()
                          if v is not None or k in saved})
    spec.save_max_length = save_max_length or saved.get("max_length")
    if dtype not in DTYPES:
        raise UserError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype], **lora.quantization_kwargs(quantization)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    adapter_file = folder / "adapter_config.json"
    base = json.loads(adapter_file.read_text())["base_model_name_or_path"] if adapter_file.exists() else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        backbone = AutoModel.from_pretrained(base, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # ImportError: an attention kernel's package missing
        raise UserError(f"model.path={path}: could not load a transformers model from {base}: "
                        f"{str(e).splitlines()[0][:300]}") from e
    if gradient_checkpointing:
        lora.enable_checkpointing(backbone)
    if adapter_file.exists():
        backbone = lora.load_adapter(backbone, folder, trainable=lora_config is not None)
    elif lora_config is not None:
        backbone = lora.apply_lora(backbone, quantized=bool(quantization),
                                   gradient_checkpointing=gradient_checkpointing, **lora_config)
    elif quantization:
        raise UserError("model.quantization=4bit trains through LoRA only: set model.lora (QLoRA)")
    encoder = Encoder(backbone, tokenizer, spec)
    if encoder.mlp is not None and saved.get("head") == "mlp":  # the folder's own head, trained
        read_dense_head(folder / DENSE_DIR, encoder.mlp[0])
    if encoder.latent is not None and (folder / LATENT_FILE).exists():
        from safetensors.torch import load_file

        encoder.latent.load_state_dict(load_file(folder / LATENT_FILE))
    return encoder


def freeze_unused(encoder: Encoder) -> list[str]:
    """Freeze parameters the embedding never uses (BERT's pooler head, say) and name them.

    DDP demands that every trainable parameter receives a gradient each step; a probe
    backward on two short texts finds the ones that cannot.
    """
    was_training = encoder.training
    encoder.train()
    ids, mask = pad(encoder.tokenize(["a probe", "another probe text"]), encoder.pad_id, encoder.left_pad)
    encoder.zero_grad(set_to_none=True)
    encoder(ids, mask).sum().backward()
    unused = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in encoder.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    encoder.train(was_training)
    return unused
