"""Merging model folders: whole sentence-transformers pipelines, weights streamed one tensor at a time.

    model folders --> inspect (files, architecture, tokenizer, pipeline, tensor names/shapes)
                  --> for each tensor name: read it from every model, merge (merge_methods.py),
                      write to a shard
                  --> temp folder with the reference model's other files --> rename

Only the pieces that decide an embedding besides weights travel as files (pooling,
normalisation, prompts, max length, dense modules' configs, tokenizer): they are taken from
one model and must agree across the models (compared as sentence-transformers reads them, its
defaults filled in), or the merge is refused naming the first file that differs and its keys.
Memory: the n tensors of one name plus one output shard (`shard_mb`), never n models. LoRA adapters
are folded into their base here too. The merge job and its weight search are in jobs/merge.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from train.atomic import atomic_folder
from train.errors import UserError
from train.merge_methods import MergeMethod, lora_delta, make_method
from train.st_folder import pooling_config, run_model_dir

WEIGHT_FILES = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                          r"pytorch_model.*\.bin(\.index\.json)?)$")
# config.json keys that describe where a model came from, not what it computes
CONFIG_META = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
               "gradient_checkpointing", "_attn_implementation_autoset", "_commit_hash", "return_dict",
               "output_attentions", "output_hidden_states"}


# --- model folders ----------------------------------------------------------------------------------


@dataclass
class Folder:
    """A model folder's weights as (group, name) -> (file, key); group "" is the transformer at the
    root, others are module folders with weights of their own (a sentence-transformers `2_Dense`)."""

    path: Path
    label: str  # how errors name it: "merge.models[1] (/path)"
    tensors: dict[tuple[str, str], tuple[Path, str]] = field(default_factory=dict)
    shapes: dict[tuple[str, str], tuple[tuple[int, ...], str]] = field(default_factory=dict)


def _weight_files(folder: Path, label: str) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{label}: {index} is not a safetensors index (expected a weight_map): {e}") from e
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{label}: shard {folder / missing[0]} listed in {index.name} is missing "
                            "(a partial download or copy?)")
        return [folder / f for f in files]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("pytorch_model*.bin")):
        raise UserError(f"{label}: only pytorch_model.bin weights in {folder}; merging streams safetensors "
                        "(load it and save_pretrained(safe_serialization=True) first)")
    return []


def open_folder(path: str | Path, label: str, need_tokenizer: bool = True) -> Folder:
    """Index a model folder (a run dir stands for its model/), refusing missing or partial ones."""
    from safetensors import safe_open

    p = run_model_dir(Path(path).expanduser())
    if not p.is_dir():
        raise UserError(f"{label}: no such model folder (expected a folder with config.json and model.safetensors)")
    if not (p / "config.json").is_file():
        raise UserError(f"{label}: {p / 'config.json'} is missing (expected a transformers model folder)")
    if need_tokenizer and not any((p / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json",
                                                               "tokenizer.model", "spiece.model")):
        raise UserError(f"{label}: no tokenizer files in {p} (expected tokenizer.json or a vocabulary file)")
    folder = Folder(p, label)
    groups = [""] + [m["path"] for m in _modules(p, label) if m.get("path") and (p / m["path"]).is_dir()]
    for group in groups:
        files = _weight_files(p / group if group else p, label)
        if group == "" and not files:
            raise UserError(f"{label}: no weights in {p} (expected model.safetensors or model.safetensors.index.json)")
        for f in files:
            try:
                with safe_open(str(f), "pt") as st:
                    for key in st.keys():
                        sl = st.get_slice(key)
                        folder.tensors[(group, key)] = (f, key)
                        folder.shapes[(group, key)] = (tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # a truncated or corrupt file: safetensors' own error, one line
                raise UserError(f"{label}: cannot read {f}: {str(e).splitlines()[0][:200]}") from e
    return folder


def _modules(folder: Path, label: str) -> list[dict]:
    f = folder / "modules.json"
    if not f.is_file():
        return []
    modules = json.loads(f.read_text())
    for m in modules:
        # Normalize has nothing to load, and published folders often omit its empty folder
        if m.get("path") and not (folder / m["path"]).is_dir() and not m.get("type", "").endswith("Normalize"):
            raise UserError(f"{label}: modules.json names {m['path']}/ ({m.get('type')}), which is missing in {folder}")
    return modules


def _json(path: Path) -> object:
    return json.loads(path.read_text()) if path.is_file() else None


def pipeline_signature(folder: Path) -> dict[str, object]:
    """What turns token states into an embedding, besides weights: module list, each module's
    config (pooling mode, dense sizes and activation, ...), prompts, max length, truncation."""
    sig: dict[str, object] = {}
    modules = _json(folder / "modules.json") or []
    sig["modules.json"] = [(m.get("type"), m.get("path")) for m in modules]
    for m in modules:
        if m.get("path"):
            for f in sorted((folder / m["path"]).glob("*.json")):
                sig[f"{m['path']}/{f.name}"] = module_config(m.get("type") or "", f.name, _json(f))
    cst = _json(folder / "config_sentence_transformers.json") or {}
    for key in ("prompts", "default_prompt_name", "similarity_fn_name", "truncate_dim"):
        sig[f"config_sentence_transformers.json: {key}"] = _or_default(key, cst.get(key))
    sbert = _json(folder / "sentence_bert_config.json") or {}
    for key in ("max_seq_length", "do_lower_case"):
        sig[f"sentence_bert_config.json: {key}"] = _or_default(key, sbert.get(key))
    return sig


# What sentence-transformers assumes for a key a folder leaves out, so that folders written by
# different versions (all-MiniLM-L6-v2's omits the newer pooling keys, ours writes them all) compare
# by meaning. similarity_fn_name: sentence-transformers uses cosine when none is set.
ST_DEFAULTS = {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine", "truncate_dim": None,
               "do_lower_case": False}
DENSE_DEFAULTS = {"bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}


def _or_default(key: str, value: object) -> object:
    if key == "prompts":  # an empty prompt is no prompt
        return {k: v for k, v in (value or {}).items() if v}
    return ST_DEFAULTS[key] if value is None and key in ST_DEFAULTS else value


def module_config(module_type: str, name: str, cfg: object) -> object:
    """A module's config file with sentence-transformers' defaults filled in (pooling: in the
    long-standing one-flag-per-mode layout, st_folder.pooling_config)."""
    if name != "config.json" or not isinstance(cfg, dict):
        return cfg
    if module_type.endswith("Dense"):
        return {**DENSE_DEFAULTS, **cfg}
    return pooling_config(cfg) if module_type.endswith("Pooling") else cfg


def architecture(folder: Path) -> dict:
    """config.json with the library's defaults filled in (an old file omits keys a new one writes),
    minus provenance keys."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(folder).to_dict()
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'}: not a transformers config: {str(e).splitlines()[0][:200]}") from e
    return {k: v for k, v in cfg.items() if k not in CONFIG_META}


def tokenizer_signature(folder: Path) -> dict:
    """tokenizer.json without its truncation/padding settings (run-time, not vocabulary); without
    one, the vocabulary files' hashes."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        sig = json.loads(tj.read_text())
        sig.pop("truncation", None)
        sig.pop("padding", None)
        return {f"tokenizer.json: {k}": v for k, v in sig.items()}
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
            for f in ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")
            if (folder / f).is_file()}


def first_difference(a: dict, b: dict) -> tuple[str, object, object] | None:
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return key, a.get(key, "<absent>"), b.get(key, "<absent>")
    return None


def describe_difference(key: str, x: object, y: object) -> str:
    """`key is y, expected x`; for two configs (non-empty dicts), each key that differs with both values."""
    if isinstance(x, dict) and isinstance(y, dict) and x and y:
        keys = list(x) + [k for k in y if k not in x]
        return f"{key}: " + "; ".join(f"{k} is {_short(y.get(k, '<absent>'))}, expected {_short(x.get(k, '<absent>'))}"
                                      for k in keys if x.get(k, "<absent>") != y.get(k, "<absent>"))
    return f"{key} is {_short(y)}, expected {_short(x)}"


def _short(v: object) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def check_compatible(ref: Folder, other: Folder, pipeline: bool = True, strict: bool = True) -> None:
    """Refuse `other` unless it computes the same function shape as `ref`: architecture, tokenizer,
    (pipeline), then every floating tensor's name and shape. Names the first mismatch. With
    strict=False (a base model) extra tensors in `other` are allowed: it only supplies task vectors."""
    checks = [("architecture (config.json)", architecture), ("tokenizer", tokenizer_signature)]
    if pipeline:
        checks.append(("embedding pipeline", pipeline_signature))
    for what, sig in checks:
        diff = first_difference(sig(ref.path), sig(other.path))
        if diff:
            key, x, y = diff
            said = describe_difference(key, x, y) if what == "embedding pipeline" else \
                f"{key} is {_short(y)}, expected {_short(x)}"
            raise UserError(f"{other.label} differs from {ref.label} in its {what}: {said}"
                            + (" (merge.spec_from=INDEX takes the pipeline of one model and ignores "
                               "the others')" if what == "embedding pipeline" else ""))
    for key, (shape, dtype) in ref.shapes.items():
        if not is_float(dtype):
            continue
        if key not in other.shapes:
            raise UserError(f"{other.label} has no tensor {_name(key)} (expected shape {list(shape)}, "
                            f"as in {ref.label})")
        if other.shapes[key][0] != shape:
            raise UserError(f"{other.label}: tensor {_name(key)} has shape {list(other.shapes[key][0])}, "
                            f"expected {list(shape)} (as in {ref.label})")
    extra = [k for k, (_, dtype) in other.shapes.items() if is_float(dtype) and k not in ref.shapes]
    if strict and extra:
        raise UserError(f"{other.label} has a tensor {_name(extra[0])} that {ref.label} lacks")


def is_float(dtype: str) -> bool:
    return dtype in ("F64", "F32", "F16", "BF16")


def _name(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}" if key[0] else key[1]


# --- the streaming driver ---------------------------------------------------------------------------


class Readers(contextlib.ExitStack):
    """Open safetensors files by path, lazily; get(folder, key) reads one tensor."""

    def __init__(self):
        super().__init__()
        self.handles: dict[Path, object] = {}

    def get(self, folder: Folder, key: tuple[str, str]) -> torch.Tensor:
        from safetensors import safe_open

        path, name = folder.tensors[key]
        if path not in self.handles:
            self.handles[path] = self.enter_context(safe_open(str(path), "pt"))
        return self.handles[path].get_tensor(name)


def merged_tensors(ref: Folder, models: list[Folder], base: Folder | None, how: MergeMethod,
                   adapters: list[Adapter] | None = None) -> Iterator[tuple[tuple[str, str], torch.Tensor]]:
    """(group, name) -> merged tensor, one name at a time, in the reference's dtype. Non-float
    tensors (integer buffers) are copied from the reference."""
    with Readers() as readers:
        for key, (_, dtype) in ref.shapes.items():
            ref_t = readers.get(ref, key)
            if not is_float(dtype):
                yield key, ref_t
                continue
            if how.method == "lora":
                out = ref_t.float()
                for adapter, w in zip(adapters, how.weights):
                    out = adapter.apply(key, out, w)
            else:
                out = how.merge(_name(key), lambda i, k=key: readers.get(models[i], k), len(models),
                                   readers.get(base, key) if base is not None else None)
            yield key, out.to(ref_t.dtype).contiguous()


def write_folder(ref: Folder, stream: Iterator[tuple[tuple[str, str], torch.Tensor]], out: Path,
                 shard_mb: int = 4096, metadata: dict | None = None) -> Path:
    """Write a model folder atomically: the reference's non-weight files, then the streamed
    tensors in shards of at most `shard_mb` (an index when there is more than one), then rename."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_folder(out) as tmp:
        shutil.copytree(ref.path, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if WEIGHT_FILES.match(n) or n.startswith(".")])
        meta = {"format": "pt", **(metadata or {})}
        shards: dict[str, list[tuple[str, list[str]]]] = {}  # group -> [(file, names)]
        pending: dict[str, dict[str, torch.Tensor]] = {}
        sizes: dict[str, int] = {}

        def flush(group: str) -> None:
            names = list(pending[group])
            fname = f"part-{len(shards.setdefault(group, []))}.safetensors"
            save_file(pending.pop(group), str((tmp / group) / fname), metadata=meta)
            shards[group].append((fname, names))
            sizes[group] = 0

        for (group, name), t in stream:
            nbytes = t.numel() * t.element_size()
            if pending.get(group) and sizes[group] + nbytes > shard_mb * 2**20:
                flush(group)
            pending.setdefault(group, {})[name] = t
            sizes[group] = sizes.get(group, 0) + nbytes
        for group in list(pending):
            flush(group)
        for group, parts in shards.items():
            folder = tmp / group
            if len(parts) == 1:
                os.replace(folder / parts[0][0], folder / "model.safetensors")
                continue
            weight_map = {}
            for i, (fname, names) in enumerate(parts):
                final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                os.replace(folder / fname, folder / final)
                weight_map.update({n: final for n in names})
            total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
            (folder / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out


# --- LoRA adapters ----------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A peft LoRA adapter folder, matched to a base folder's tensors."""

    path: Path
    label: str
    deltas: dict[tuple[str, str], tuple[str, str, float, bool]]  # base key -> (A key, B key, scaling, transpose)
    replaced: dict[tuple[str, str], str]  # base key -> adapter key (modules_to_save: a whole new tensor)
    handle: object = None

    def apply(self, key: tuple[str, str], w: torch.Tensor, weight: float) -> torch.Tensor:
        if key in self.replaced:
            return self.handle.get_tensor(self.replaced[key]).float()
        if key not in self.deltas:
            return w
        a_key, b_key, scaling, transpose = self.deltas[key]
        a, b = self.handle.get_tensor(a_key), self.handle.get_tensor(b_key)
        return w + weight * lora_delta(a, b, scaling, transpose)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def open_adapter(path: str, label: str, base: Folder, base_name: str, check_base: bool = True) -> Adapter:
    from safetensors import safe_open

    p = Path(path).expanduser()
    cfg_file, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not p.is_dir():
        raise UserError(f"{label}: no such adapter folder (expected adapter_config.json and adapter_model.safetensors)")
    for f in (cfg_file, weights):
        if not f.is_file():
            raise UserError(f"{label}: {f} is missing (expected a peft LoRA adapter folder)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{label}: peft_type {cfg.get('peft_type')!r}; only LORA adapters can be merged here")
    if cfg.get("use_dora"):
        raise UserError(f"{label}: a DoRA adapter (use_dora=true); only plain LoRA is merged here")
    want = cfg.get("base_model_name_or_path")
    if check_base and want and not _same_model(want, base.path, base_name):
        raise UserError(f"{label}: adapter_config.json says its base is {want!r}, but merge.base is {base_name!r} "
                        "(pass that base, or merge.check_adapter_base=false if it is a copy of it)")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    adapter = Adapter(p, label, {}, {})
    names = {k for _, k in base.tensors}
    with safe_open(str(weights), "pt") as st:
        keys = list(st.keys())
        shapes = {k: tuple(st.get_slice(k).get_shape()) for k in keys}
    for key in keys:
        m = re.match(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_embedding_A)(?:\.weight)?$", key)
        if not m:
            if ".lora_" in key or key.endswith(("lora_B.weight", "lora_embedding_B")):
                continue
            if "modules_to_save" in key or cfg.get("modules_to_save"):
                target = _base_key(key.replace("base_model.model.", "", 1).replace(".modules_to_save", ""), names)
                if target is None:
                    raise UserError(f"{label}: {key} replaces a tensor the base {base_name} does not have")
                adapter.replaced[("", target)] = key
                continue
            raise UserError(f"{label}: unexpected tensor {key} in {weights.name} (expected LoRA A/B matrices)")
        module, kind = m.group(1), m.group(2)
        b_key = key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        if b_key not in shapes:
            raise UserError(f"{label}: {key} has no matching {b_key}")
        target = _base_key(module + ".weight", names)
        if target is None:
            raise UserError(f"{label}: adapter module {module} has no weight in the base {base_name} "
                            "(an adapter for another model?)")
        rank = _pattern_value(cfg.get("rank_pattern"), module, r)
        a_shape, b_shape = shapes[key], shapes[b_key]
        base_shape = base.shapes[("", target)][0]
        embedding = kind == "lora_embedding_A"
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out")) and not embedding
        transpose = embedding or fan_in_fan_out
        out_in = (b_shape[0], a_shape[1])  # the delta's shape before any transpose
        if (out_in[::-1] if transpose else out_in) != tuple(base_shape) or a_shape[0] != rank or b_shape[1] != rank:
            raise UserError(f"{label}: {module}: LoRA A {list(a_shape)} and B {list(b_shape)} (rank {rank}) do not fit "
                            f"the base weight {target} of shape {list(base_shape)}")
        a = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        # rsLoRA (Kalajdzievski, arXiv 2312.03732) scales by alpha / sqrt(r) instead of alpha / r
        scaling = a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
        adapter.deltas[("", target)] = (key, b_key, scaling, transpose)
    if not adapter.deltas and not adapter.replaced:
        raise UserError(f"{label}: {weights} holds no LoRA weights")
    return adapter


def _base_key(name: str, names: set[str]) -> str | None:
    """The base tensor a peft module path refers to: the same name, or one that differs by a model
    prefix (peft wraps `BertModel` as `encoder...`, a checkpoint may say `bert.encoder...`)."""
    if name in names:
        return name
    found = [n for n in names if n.endswith("." + name) or name.endswith("." + n)]
    return found[0] if len(found) == 1 else None


def _same_model(want: str, base_path: Path, base_name: str) -> bool:
    """Whether an adapter's recorded base is the given one: the same folder, or the same name."""
    p = Path(want).expanduser()
    if p.exists():
        with contextlib.suppress(OSError):
            return p.resolve() == base_path.resolve() or p.resolve() == Path(base_name).expanduser().resolve()
    return want.rstrip("/") in (base_name.rstrip("/"), str(base_path))


# --- the whole merge --------------------------------------------------------------------------------


@dataclass
class MergePlan:
    """Everything a merge needs, checked: the reference (whose pipeline files are kept), inputs, base."""

    ref: Folder
    models: list[Folder]
    base: Folder | None
    adapters: list[Adapter] | None
    how: MergeMethod  # the method and its weights


def plan_merge(models: Sequence[str], method: str, weights: Sequence[float] | None = None,
               base: str | None = None, spec_from: int | None = None, scale: float = 1.0, density: float = 0.2,
               drop_rate: float = 0.9, seed: int = 0, check_adapter_base: bool = True) -> MergePlan:
    """Open and check every input before anything is written."""
    models = list(models or [])
    if not models:
        raise UserError("merge.models is empty: expected a list of model folders, e.g. merge.models=[dir_a,dir_b]")
    how = make_method(method, len(models), weights, base is not None, scale, density, drop_rate, seed)
    base_folder = open_folder(base, f"merge.base ({base})") if base is not None else None
    if method == "lora":
        adapters = [open_adapter(m, f"merge.models[{i}] ({m})", base_folder, base, check_adapter_base)
                    for i, m in enumerate(models)]
        return MergePlan(base_folder, [base_folder], base_folder, adapters, how)
    folders = [open_folder(m, f"merge.models[{i}] ({m})") for i, m in enumerate(models)]
    if spec_from is not None and not 0 <= spec_from < len(folders):
        raise UserError(f"merge.spec_from={spec_from}: expected an index into merge.models (0 .. {len(folders) - 1})")
    ref = folders[spec_from or 0]
    for f in folders:
        if f is not ref:
            check_compatible(ref, f, pipeline=spec_from is None)
    if base_folder is not None and method != "lora":
        check_compatible(ref, base_folder, pipeline=False, strict=False)  # the base is only a source of task vectors
    return MergePlan(ref, folders, base_folder, None, how)


def run_plan(plan: MergePlan, out: Path, shard_mb: int = 4096) -> Path:
    meta = {"train_merge": json.dumps({"method": plan.how.method, "weights": plan.how.weights,
                                       "models": [str(m.path) for m in plan.models] if plan.adapters is None
                                       else [str(a.path) for a in plan.adapters],
                                       "base": str(plan.base.path) if plan.base else None})}
    if plan.adapters:
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            for a in plan.adapters:
                a.handle = stack.enter_context(safe_open(str(a.path / "adapter_model.safetensors"), "pt"))
            return write_folder(plan.ref, merged_tensors(plan.ref, plan.models, None, plan.how, plan.adapters),
                                out, shard_mb, meta)
    return write_folder(plan.ref, merged_tensors(plan.ref, plan.models, plan.base, plan.how), out, shard_mb, meta)
