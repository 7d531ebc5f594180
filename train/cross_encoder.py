"""The cross-encoder (re-ranker): query and passage read together, one relevance score out.

    (query, passage) pairs -> token ids (tokenize) -> [N] scores (forward)

Any transformers AutoModelForSequenceClassification with 1 label (the score is the logit) or 2
labels (the score is logit[1] - logit[0], the log-odds of "relevant"), as teacher.py reads one.
A bi-encoder folder (all-MiniLM-L6-v2, say) loads with a new, randomly initialised one-label
head: it must be trained before it ranks anything (Nogueira & Cho, arXiv 1901.04085: BERT
fine-tuned as a passage re-ranker).

Saved as a sentence-transformers CrossEncoder folder (modules.json, sentence_bert_config.json,
config_sentence_transformers.json beside the transformers files), so `CrossEncoder(path)` loads it
and `predict` gives sigmoid(score) (1 label) or the two logits (2 labels); plain transformers and
the mining job's teacher read the same folder. The saved max length is the inference length
(model.save_max_length, else the base model's), never the training cut (model.max_length).

Knows nothing of torch.distributed: the loop wraps it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from train.atomic import atomic_folder
from train.boundary import check_safetensors
from train.errors import UserError
from train.model import Padded
from train.st_folder import float32_files, resolve_model_dir

# sentence-transformers' CrossEncoder: one Transformer module in sequence-classification mode whose
# output is the logits, and the activation `predict` applies by default (its own defaults: sigmoid
# for one label, none for more).
ACTIVATIONS = {1: "torch.nn.modules.activation.Sigmoid", 2: "torch.nn.modules.activation.Identity"}
ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}]
ST_MODULE_CONFIG = {"transformer_task": "sequence-classification",
                    "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
                    "module_output_name": "scores"}


def is_cross_encoder(folder: Path) -> bool:
    """A folder whose config.json names a ...ForSequenceClassification architecture."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def relevance(logits: torch.Tensor) -> torch.Tensor:
    """[N, labels] -> [N]: the logit (1 label) or the log-odds of label 1 over label 0 (2 labels)."""
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


class CrossEncoder(Padded, nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer, max_length: int, save_max_length: int):
        super().__init__()
        self.backbone = backbone  # the name engines._backbone_keys strips from a gathered state dict
        self.tokenizer = tokenizer
        self.max_length, self.save_max_length = max_length, save_max_length
        self.notes: list[str] = []
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has no pad token; set one before training")
        # BERT-style models mark the passage's tokens with segment 1 (token_type_ids); pad() makes
        # only ids and mask, so the segments are recovered in forward() from the first separator.
        self.segments = "token_type_ids" in tokenizer.model_input_names and \
            int(getattr(backbone.config, "type_vocab_size", 1) or 1) > 1
        self.sep_id = tokenizer.sep_token_id

    @property
    def num_labels(self) -> int:
        return int(self.backbone.config.num_labels)

    def tokenize(self, pairs: Sequence[tuple[str, str]], side: str | None = None) -> list[list[int]]:
        """(query, passage) pairs -> token ids, unpadded, the pair cut to max_length tokens by
        trimming the longer text first (the tokenizer's longest_first, as CrossEncoder.predict).
        `side` is unused: the prefetcher calls every model's tokenize(texts, side)."""
        if not pairs:
            return []
        queries, passages = zip(*pairs)
        return self.tokenizer(list(queries), list(passages), truncation=True, max_length=self.max_length)["input_ids"]

    def token_types(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, L] segment ids: 0 up to and including the first separator, 1 after it, 0 on padding
        (what a BERT tokenizer returns for a pair: [CLS] query [SEP] passage [SEP])."""
        is_sep = (input_ids == self.sep_id).long()
        after_first = (is_sep.cumsum(1) - is_sep) > 0
        return (after_first & (attention_mask > 0)).long()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [N, L] -> [N] relevance scores
        attn = (attention_mask > 0).long()
        kwargs = {"token_type_ids": self.token_types(input_ids, attn)} if self.segments else {}
        logits = self.backbone(input_ids=input_ids, attention_mask=attn, **kwargs).logits
        return relevance(logits.float())

    def save(self, out: str | Path, state_dict: dict | None = None, texts: dict[str, str] | None = None) -> Path:
        """A sentence-transformers CrossEncoder folder, atomically (temp folder, then rename)."""
        from train.model import no_deepspeed_probe

        with atomic_folder(out) as tmp:
            with no_deepspeed_probe():
                self.backbone.save_pretrained(tmp, state_dict=state_dict)
            trained_length = self.tokenizer.model_max_length
            self.tokenizer.model_max_length = self.save_max_length  # the inference length, not the training cut
            try:
                self.tokenizer.save_pretrained(tmp)
            finally:
                self.tokenizer.model_max_length = trained_length
            (tmp / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
            (tmp / "sentence_bert_config.json").write_text(json.dumps(ST_MODULE_CONFIG, indent=2))
            (tmp / "config_sentence_transformers.json").write_text(json.dumps(
                {"model_type": "CrossEncoder", "activation_fn": ACTIVATIONS[self.num_labels], "prompts": {},
                 "default_prompt_name": None}, indent=2))
            if any(p.dtype == torch.float64 for p in self.parameters()):
                float32_files(tmp)  # model.dtype=float64 trains in float64; the saved model is float32
            for name, text in (texts or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
        return Path(out)


def load_cross_encoder(path: str, max_length: int | None = None, save_max_length: int | None = None,
                       dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> CrossEncoder:
    """A cross-encoder folder or hub name as it is; any other encoder folder with a new one-label head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = resolve_model_dir(path)
    check_safetensors(folder, f"model.path={path}")
    trained = is_cross_encoder(folder)
    kwargs = {"dtype": dtype, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    try:
        config = AutoConfig.from_pretrained(folder)
        if trained and config.num_labels not in (1, 2):
            raise UserError(f"model.path={path}: a classifier with {config.num_labels} labels; a re-ranker needs 1 "
                            "(a relevance logit) or 2 (not relevant, relevant)")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        backbone = AutoModelForSequenceClassification.from_pretrained(
            folder, **({} if trained else {"num_labels": 1}), **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"model.path={path}: could not load a transformers model from {folder}: "
                        f"{str(e).splitlines()[0][:300]}") from e
    positions = int(getattr(backbone.config, "max_position_embeddings", 0) or 0) or 512
    base_length = min(int(tokenizer.model_max_length), positions)
    enc = CrossEncoder(backbone, tokenizer, max_length or min(base_length, 512), save_max_length or base_length)
    if not trained:
        enc.notes.append(f"{path} is not a cross-encoder: its classification head (1 label) is newly initialised "
                         "and must be trained before it ranks anything")
    return enc
