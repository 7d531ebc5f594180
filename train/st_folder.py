"""The sentence-transformers folder format, and where model folders are found.

A saved model is a sentence-transformers folder (modules.json, 1_Pooling/, 2_Normalize/,
config_sentence_transformers.json with the prompts) in the long-standing layout that every
sentence-transformers release reads, with the backbone at the folder's root so that
`transformers.AutoModel.from_pretrained(folder)` loads it too. What only this project reads back
(bidirectional attention, latent pooling, instruction template) sits under `train_encoder_spec`.
Loading reads the same files back, so pooling and prompts travel with the model.

Path rules: a run dir stands for the model it saved (`<run dir>/model`), so one stage starts from
another's run dir; a name that is no local folder is a Hugging Face Hub name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from train.atomic import write_json
from train.errors import UserError

if TYPE_CHECKING:
    from train.model import EncoderSpec

POOLINGS = ("mean", "cls", "last", "latent", "echo")  # latent, echo: train/llm.py
# sentence-transformers' pooling modes -> their flag in the long-standing config layout (one per mode)
POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens",
                 "mean": "pooling_mode_mean_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                 "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
OUR_POOLING = {"cls": "cls", "mean": "mean", "lasttoken": "last"}  # the modes the Encoder computes itself


def pooling_config(cfg: dict) -> dict:
    """A Pooling module's config.json as sentence-transformers reads it, in the long-standing layout
    (one flag per mode: what this project writes and older folders hold): the newer `pooling_mode`
    (a mode or a list) and `embedding_dimension` are turned into it, and a config with no mode set
    means mean pooling."""
    cfg = dict(cfg)
    if "embedding_dimension" in cfg:
        cfg["word_embedding_dimension"] = cfg.pop("embedding_dimension")
    modes = cfg.pop("pooling_mode", None)
    flags = {flag: bool(cfg.pop(flag, False)) for flag in POOLING_FLAGS.values()}
    if modes is not None:
        modes = [modes] if isinstance(modes, str) else list(modes)
        flags = {flag: mode in modes for mode, flag in POOLING_FLAGS.items()}
    if not any(flags.values()):
        flags["pooling_mode_mean_tokens"] = True
    return {**cfg, **flags, "include_prompt": cfg.get("include_prompt", True)}

LATENT_FILE = "latent_attention.safetensors"
HEADS = ("none", "mlp", "mlp_train")  # config.Head; mlp_train is never saved
DENSE_DIR = "2_Dense"  # the MLP head, kept (SimCSE supervised): a sentence-transformers Dense module
TANH = "torch.nn.modules.activation.Tanh"


class NeedsTrainLoader(nn.Module):
    """Named in modules.json instead of the Pooling module when sentence-transformers would
    compute a different embedding (latent or echo pooling, bidirectional attention): loading
    fails with this message instead of silently differing."""

    MESSAGE = ("this model uses {what}, which sentence-transformers does not implement; load it with "
               "`train.model.load_encoder(folder)` and embed with `train.embed.encode`")

    @classmethod
    def load(cls, *args, **kwargs):
        raise ValueError(cls.MESSAGE.format(what="pooling or attention from the `train` project"))

    def __init__(self, *args, **kwargs):
        raise ValueError(self.MESSAGE.format(what="pooling or attention from the `train` project"))


def write_st_config(folder: Path, spec: EncoderSpec, dim: int) -> None:
    pooling_type = "sentence_transformers.models.Pooling" if spec.sentence_transformers_compatible \
        else "train.st_folder.NeedsTrainLoader"
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": pooling_type},
    ]
    if spec.head == "mlp":  # its weights: write_dense_head
        modules.append({"idx": 2, "name": "2", "path": DENSE_DIR, "type": "sentence_transformers.models.Dense"})
    if spec.normalize:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / f"{n}_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": spec.pooling == "cls",
        "pooling_mode_mean_tokens": spec.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": spec.pooling == "last",
        "include_prompt": spec.pool_prompt,
    })
    write_json(folder / "modules.json", modules)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": spec.save_max_length or spec.max_length,
                                                      "do_lower_case": False})
    # a training-only head (mlp_train) is not part of the saved model
    saved_spec = {**asdict(spec), "head": "mlp" if spec.head == "mlp" else "none"}
    st_config = {"prompts": dict(spec.prompts), "default_prompt_name": None, "similarity_fn_name": "cosine",
                 "train_encoder_spec": saved_spec}
    if spec.truncate_dim:  # sentence-transformers reads it back (its cosine similarity makes the scale moot)
        st_config["truncate_dim"] = spec.truncate_dim
    write_json(folder / "config_sentence_transformers.json", st_config)


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
            pc = pooling_config(json.loads((folder / m["path"] / "config.json").read_text()))
            modes = [mode for mode, flag in POOLING_FLAGS.items() if pc[flag]]
            mode = OUR_POOLING.get(modes[0]) if len(modes) == 1 else None
            if mode is None and m["type"].endswith("Pooling"):
                raise UserError(f"{folder / m['path'] / 'config.json'}: pooling {'+'.join(modes)!r} is not supported; "
                                f"expected one of {', '.join(POOLINGS)}")
            found["pooling"] = mode
            found["dim"] = pc.get("word_embedding_dimension")
        if m.get("type", "").endswith("Dense"):
            found["head"] = _dense_head(folder / m["path"] / "config.json", found.get("dim"))
    found.pop("dim", None)
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


def _dense_head(config_file: Path, dim: int | None) -> str:
    """A Dense module this project can compute: SimCSE's head, D -> D with bias and tanh."""
    cfg = {"bias": True, "activation_function": TANH, **json.loads(config_file.read_text())}
    if (cfg.get("in_features"), cfg.get("out_features"), cfg["bias"], cfg["activation_function"]) != (dim, dim, True,
                                                                                                      TANH):
        raise UserError(f"{config_file}: a Dense module {cfg.get('in_features')} -> {cfg.get('out_features')} "
                        f"(bias {cfg['bias']}, {cfg['activation_function']}) is not supported; expected SimCSE's "
                        f"head, {dim} -> {dim} with bias and {TANH}")
    return "mlp"


def write_dense_head(folder: Path, linear: nn.Linear) -> None:
    """The kept MLP head as sentence-transformers writes a Dense module: config.json, and
    model.safetensors with `linear.weight` [out, in] and `linear.bias`."""
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    write_json(folder / "config.json", {"in_features": linear.in_features, "out_features": linear.out_features,
                                        "bias": True, "activation_function": TANH})
    save_file({f"linear.{k}": v.detach().float().cpu().contiguous() for k, v in linear.state_dict().items()},
              folder / "model.safetensors")


def read_dense_head(folder: Path, linear: nn.Linear) -> None:
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights}: missing; the folder's modules.json names a Dense head ({folder.name})")
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in load_file(weights).items()})


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


def float32_files(folder: Path) -> None:
    """Rewrite a just-saved folder's float64 tensors in float32 (every *.safetensors below it) and
    its config.json `dtype` to match. model.dtype=float64 is a training precision (exact CPU
    comparisons, train/config.py); sentence-transformers and transformers users load float32, and
    float64 weights would double the folder for nothing at inference."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for weights in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if any(t.dtype == torch.float64 for t in tensors.values()):
            save_file({k: t.float() if t.dtype == torch.float64 else t for k, t in tensors.items()}, str(weights),
                      metadata=metadata)
    for config in sorted(folder.rglob("config.json")):
        data = json.loads(config.read_text())
        if isinstance(data, dict) and data.get("dtype") == "float64":
            write_json(config, {**data, "dtype": "float32"}, indent=2)
