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

from train.errors import UserError

POOLINGS = ("mean", "cls", "last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EncoderSpec:
    """Everything besides the weights that decides an embedding; saved with the model."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 128
    prompts: dict[str, str] = field(default_factory=dict)  # side ("query", "passage") -> prefix
    truncate_dim: int | None = None  # keep the first N dimensions (Matryoshka), re-normalised

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"model.pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.max_length < 2:
            raise UserError(f"model.max_length={self.max_length}: expected at least 2")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [N, L, D], mask [N, L] -> [N, D]."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [N, L, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        # Position of the last real token, right or left padding alike: argmax over
        # mask * position picks the highest attended index.  [N]
        pos = torch.arange(mask.shape[1], device=mask.device)
        last = (mask * pos).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(how)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids [N, L], attention_mask [N, L]) padded to the longest."""
    n, length = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, length - len(s):] = torch.as_tensor(s)
            mask[i, length - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.as_tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


class Encoder(nn.Module):
    """texts -> token ids (tokenize) -> [N, D] embeddings (forward)."""

    def __init__(self, backbone: nn.Module, tokenizer, spec: EncoderSpec):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.spec = spec
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; set one before training")
        full = int(self.backbone.config.hidden_size)
        if spec.truncate_dim is not None and not 0 < spec.truncate_dim <= full:
            raise UserError(f"model.truncate_dim={spec.truncate_dim}: expected 1 .. {full} (the model's dimension)")

    @property
    def dim(self) -> int:
        return self.spec.truncate_dim or int(self.backbone.config.hidden_size)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def left_pad(self) -> bool:
        return self.tokenizer.padding_side == "left"

    def tokenize(self, texts: Sequence[str], side: str | None = None) -> list[list[int]]:
        """Prompted, truncated token ids, unpadded: padding is decided per chunk later."""
        prefix = self.spec.prompts.get(side, "") if side else ""
        texts = [prefix + t for t in texts] if prefix else list(texts)
        enc = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length)
        return enc["input_ids"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [N, L] -> [N, D]
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        emb = pool(hidden, attention_mask, self.spec.pooling).float()
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
        try:
            self.backbone.save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            write_st_config(tmp, self.spec, int(self.backbone.config.hidden_size))  # pooling sees all dims
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


def write_st_config(folder: Path, spec: EncoderSpec, dim: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
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
        "include_prompt": True,
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
        if m.get("type", "").endswith("Pooling"):
            pc = json.loads((folder / m["path"] / "config.json").read_text())
            mode = pc.get("pooling_mode") or next(
                (k for k in ("cls", "mean", "last") if pc.get({"cls": "pooling_mode_cls_token",
                                                               "mean": "pooling_mode_mean_tokens",
                                                               "last": "pooling_mode_lasttoken"}[k])), None)
            if mode == "lasttoken":
                mode = "last"
            if mode not in POOLINGS:
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
    return found


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder as is (a run dir stands for its saved `model/`, so one stage starts from
    another's run dir); otherwise a Hugging Face Hub name, downloaded (or taken from cache)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return p / "model"
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
                 truncate_dim: int | None = None) -> Encoder:
    """Load a model folder or hub name; explicit arguments override what the folder says."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_model_dir(path)
    saved = read_st_config(folder)
    spec = EncoderSpec(
        pooling=pooling if pooling is not None else saved.get("pooling", "mean"),
        normalize=normalize if normalize is not None else saved.get("normalize", True),
        max_length=max_length if max_length is not None else saved.get("max_length", 128),
        prompts=dict(prompts) if prompts is not None else saved.get("prompts", {}),
        truncate_dim=truncate_dim if truncate_dim is not None else saved.get("truncate_dim"),
    )
    if dtype not in DTYPES:
        raise UserError(f"model.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        backbone = AutoModel.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={path}: could not load a transformers model from {folder}: "
                        f"{str(e).splitlines()[0][:300]}") from e
    return Encoder(backbone, tokenizer, spec)


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
