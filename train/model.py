"""The encoder: any transformers AutoModel plus pooling, normalisation and prompts.

Saved as a sentence-transformers folder (modules.json, 1_Pooling/, 2_Normalize/,
config_sentence_transformers.json with the prompts), written in the long-standing
layout that every sentence-transformers release reads, with the backbone at the
folder's root so `transformers.AutoModel.from_pretrained(folder)` loads it too.
Loading a folder reads the same files back, so pooling and prompts travel with the
model; a config value that is set explicitly overrides what the folder says.

The encoder knows nothing of torch.distributed: the loop wraps it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from train import llm, lora
from train.boundary import check_safetensors
from train.errors import UserError

POOLINGS = ("mean", "cls", "last", "latent", "echo")  # latent, echo: train/llm.py
DECODER_ONLY = ("echo",)
# Springer et al. (arXiv 2402.15449): "Rewrite the sentence: x, rewritten sentence: x"; the
# embedding is the mean over the second copy, whose tokens have all seen the whole text.
ECHO_FIRST, ECHO_SECOND = "Rewrite the sentence: ", "\nRewritten sentence: "
# E5-Mistral (arXiv 2401.00368): instructions on the query side only, in this template.
INSTRUCTION_TEMPLATE = "Instruct: {task}\nQuery: "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"model.pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.max_length < 2:
            raise UserError(f"model.max_length={self.max_length}: expected at least 2")
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


class Encoder(nn.Module):
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

    @property
    def dim(self) -> int:
        return self.spec.truncate_dim or int(self.backbone.config.hidden_size)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def left_pad(self) -> bool:
        return self.tokenizer.padding_side == "left"

    def prefix(self, side: str | None, instruction: str | None = None) -> str:
        """What goes in front of a text: the instruction template on the query side when the data
        source or evaluation task has an instruction, else the side's prompt."""
        if instruction and side == "query":
            return self.spec.instruction_template.format(task=instruction)
        return self.spec.prompts.get(side, "") if side else ""

    def tokenize(self, texts: Sequence[str], side: str | None = None,
                 instruction: str | None = None) -> list[list[int]]:
        """Prompted, truncated token ids, unpadded: padding is decided per chunk later."""
        prefix = self.prefix(side, instruction)
        if self.spec.pooling != "echo":
            texts = [prefix + t for t in texts] if prefix else list(texts)
            enc = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length - self.append_eos)["input_ids"]
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
        room = (self.spec.max_length - len(first) - len(second) - len(self.tail)) // 2
        if room < 1:
            raise UserError(f"model.max_length={self.spec.max_length} leaves no room for text after the "
                            f"{len(first) + len(second)}-token echo prefix {prefix!r}")
        out = []
        for t in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            context = first + t[:room] + second
            out.append(llm.Tokens(context + t[:room] + self.tail, context=len(context)))
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [N, L] -> [N, D]; mask 2 = attended, not pooled (see pad)
        attn = (attention_mask > 0).long()
        if self.decoder:
            hidden = llm.decoder_hidden(self.backbone, input_ids, attn, self.spec.bidirectional)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attn).last_hidden_state
        if self.spec.pooling == "latent":
            emb = self.latent(hidden, attention_mask == 1).float()
        else:  # echo: the mean over the second copy, the first being context
            emb = pool(hidden, attention_mask, "mean" if self.spec.pooling == "echo" else self.spec.pooling).float()
        if self.spec.truncate_dim:
            emb = emb[:, : self.spec.truncate_dim]  # normalised after the cut, as Matryoshka training saw it
        return F.normalize(emb, dim=-1) if self.spec.normalize else emb

    # --- saving --------------------------------------------------------------------------------

    def save(self, out: str | Path, state_dict: dict | None = None) -> Path:
        """Write a sentence-transformers folder atomically: a temp folder, then a rename.

        `state_dict` replaces the module's own (a consolidated FSDP/ZeRO-3 state dict).
        """
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        adapter = lora.is_lora(self.backbone)
        if state_dict is not None and (adapter or self.latent is not None):
            raise UserError("a consolidated (FSDP2 / ZeRO-3) state dict cannot be saved for a LoRA or latent-"
                            "attention encoder; train those with dist.strategy=ddp")
        try:
            dim = int(self.backbone.config.hidden_size)  # pooling sees all dims
            folders = [tmp, tmp / lora.ADAPTER_DIR] if adapter else [tmp]
            if adapter:  # the merged model at the root, the adapter alone beside it
                lora.save_backbone(self.backbone, tmp)
            else:
                self.backbone.save_pretrained(tmp, state_dict=state_dict)
            for folder in folders:  # each folder loads on its own: tokenizer, pooling, latents
                self.tokenizer.save_pretrained(folder)
                write_st_config(folder, self.spec, dim)
                if self.latent is not None:
                    from safetensors.torch import save_file

                    save_file({k: v.detach().cpu().contiguous() for k, v in self.latent.state_dict().items()},
                              folder / LATENT_FILE)
            replace_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished temp folder to `out`; an older `out` is replaced only once the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _shared_prefix(ids: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading ids equal the prompt's, leaving at least one token to pool."""
    n = 0
    while n < min(len(prompt), len(ids) - 1) and ids[n] == prompt[n]:
        n += 1
    return n


LATENT_FILE = "latent_attention.safetensors"


class NeedsTrainLoader(nn.Module):
    """Named in modules.json instead of the Pooling module when sentence-transformers would
    compute a different embedding (latent or echo pooling, bidirectional attention): loading
    fails with this message instead of silently differing."""

    MESSAGE = ("this model uses {what}, which sentence-transformers does not implement; load it with "
               "`train.model.load_encoder(folder)` and embed with `train.model.encode`")

    @classmethod
    def load(cls, *args, **kwargs):
        raise ValueError(cls.MESSAGE.format(what="pooling or attention from the `train` project"))

    def __init__(self, *args, **kwargs):
        raise ValueError(self.MESSAGE.format(what="pooling or attention from the `train` project"))


def write_st_config(folder: Path, spec: EncoderSpec, dim: int) -> None:
    pooling_type = "sentence_transformers.models.Pooling" if spec.sentence_transformers_compatible \
        else "train.model.NeedsTrainLoader"
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": pooling_type},
    ]
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    _dump(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": spec.pooling == "cls",
        "pooling_mode_mean_tokens": spec.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": spec.pooling == "last",
        "include_prompt": spec.pool_prompt,
    })
    _dump(folder / "modules.json", modules)
    _dump(folder / "sentence_bert_config.json", {"max_seq_length": spec.max_length, "do_lower_case": False})
    st_config = {"prompts": dict(spec.prompts), "default_prompt_name": None, "similarity_fn_name": "cosine",
                 "train_encoder_spec": asdict(spec)}
    if spec.truncate_dim:  # sentence-transformers reads it back (its cosine similarity makes the scale moot)
        st_config["truncate_dim"] = spec.truncate_dim
    _dump(folder / "config_sentence_transformers.json", st_config)


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def read_st_config(folder: Path) -> dict:
    """What a sentence-transformers folder says about pooling, normalisation, length, prompts."""
    found: dict = {}
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return found
    modules = json.loads(modules_file.read_text())
    found["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    for m in modules:
        if m.get("type", "").endswith(("Pooling", "NeedsTrainLoader")):
            pc = json.loads((folder / m["path"] / "config.json").read_text())
            mode = pc.get("pooling_mode") or next(
                (k for k in ("cls", "mean", "last") if pc.get({"cls": "pooling_mode_cls_token",
                                                               "mean": "pooling_mode_mean_tokens",
                                                               "last": "pooling_mode_lasttoken"}[k])), None)
            if mode == "lasttoken":
                mode = "last"
            if mode not in POOLINGS and m["type"].endswith("Pooling"):
                raise UserError(f"{folder / m['path'] / 'config.json'}: pooling {mode!r} is not supported; "
                                f"expected one of {', '.join(POOLINGS)}")
            found["pooling"] = mode
    sbert = folder / "sentence_bert_config.json"
    if sbert.exists() and "max_seq_length" in json.loads(sbert.read_text()):
        found["max_length"] = int(json.loads(sbert.read_text())["max_seq_length"])
    cst = folder / "config_sentence_transformers.json"
    if cst.exists():
        st_config = json.loads(cst.read_text())
        found["prompts"] = {k: v for k, v in (st_config.get("prompts") or {}).items() if v}
        if st_config.get("truncate_dim"):
            found["truncate_dim"] = int(st_config["truncate_dim"])
        ours = st_config.get("train_encoder_spec") or {}  # what only this project reads back
        for key in ("bidirectional", "pool_prompt", "instruction_template", "latents", "latent_heads"):
            if key in ours:
                found[key] = ours[key]
        if ours.get("pooling") in ("latent", "echo"):
            found["pooling"] = ours["pooling"]
    return found


def run_model_dir(p: Path) -> Path:
    """A run dir stands for the model it saved (`<run dir>/model`); any other path is itself."""
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return p / "model"
    return p


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder as is (a run dir stands for its saved `model/`, so one stage starts from
    another's run dir); otherwise a Hugging Face Hub name, downloaded (or taken from cache)."""
    p = run_model_dir(Path(name_or_path).expanduser())
    if p.is_dir():
        return p
    if p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model.path={name_or_path}: no such model folder (a stage's run dir works too: "
                        "its model is at <run dir>/model)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path))
    except Exception as e:  # offline, unknown repo, gated: one line with the cause
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise UserError(f"model.path={name_or_path}: not a local folder, and the Hugging Face Hub "
                        f"could not provide it{hint}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def load_encoder(path: str, pooling: str | None = None, normalize: bool | None = None,
                 max_length: int | None = None, prompts: dict[str, str] | None = None,
                 dtype: str = "float32", attn_implementation: str | None = None,
                 truncate_dim: int | None = None, *, bidirectional: bool | None = None,
                 pool_prompt: bool | None = None, instruction_template: str | None = None,
                 latents: int | None = None, latent_heads: int | None = None, lora_config: dict | None = None,
                 gradient_checkpointing: bool = False, quantization: str | None = None) -> Encoder:
    """Load a model folder or hub name; explicit arguments override what the folder says.

    A folder with `adapter_config.json` (a saved `model/adapter`) loads its base model (the
    adapter's `base_model_name_or_path`) with the adapter on top. `lora_config` ({r, alpha,
    dropout, target_modules}) wraps the backbone in a fresh trainable LoRA adapter.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_model_dir(path)
    check_safetensors(folder, f"model.path={path}")  # a truncated copy, named before transformers trips on it
    saved = read_st_config(folder)
    given = {"pooling": pooling, "normalize": normalize, "max_length": max_length,
             "prompts": dict(prompts) if prompts is not None else None, "truncate_dim": truncate_dim,
             "bidirectional": bidirectional, "pool_prompt": pool_prompt,
             "instruction_template": instruction_template, "latents": latents, "latent_heads": latent_heads}
    spec = EncoderSpec(**{k: v if v is not None else saved[k] for k, v in given.items()
                          if v is not None or k in saved})
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


@torch.no_grad()
def encode(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], encoder: Encoder,
           texts: Sequence[str], side: str | None, batch_size: int = 128,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Embed texts for inference: sorted by length so each batch pads little. -> [N, D] float32 cpu."""
    ids = encoder.tokenize(texts, side)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty((len(ids), encoder.dim), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, mask = pad([ids[i] for i in idx], encoder.pad_id, encoder.left_pad)
        out[idx] = forward(input_ids.to(device), mask.to(device)).float().cpu()
    return out
