"""The model card: `model/README.md`, written into the model folder with the weights.

The YAML front matter is what the Hugging Face Hub and sentence-transformers' own cards carry
(library_name, pipeline_tag, tags, base_model, datasets, metrics, a model-index of the results), so
the folder reads as a sentence-transformers model when uploaded as is. The body says how it was made:
the recipe and the overrides as given and as resolved, the command, the data sources with the
fingerprints of run.json, the evaluation before and after training, and the versions.

Pure text: the train job passes what it measured, train/build.py what the config and the run
record say (`CardInfo`); nothing here reads a config or a process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from train import assets

KIND_TO_TASK = {"sts": "sentence-similarity", "retrieval": "retrieval", "rerank": "text-ranking"}


@dataclass
class CardInfo:
    name: str  # the model's title: the run dir's name
    recipe: str
    command: str  # as run.json records it
    base_model: str  # model.path as given
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (override as given, its key's resolved value)
    model: dict = field(default_factory=dict)  # pooling, normalisation, lengths, prompts, head
    training: dict = field(default_factory=dict)  # steps, batch, loss and optimizer values
    data: dict = field(default_factory=dict)  # run.json's "data": source -> origin, records, fingerprints
    tasks: dict = field(default_factory=dict)  # evaluation task -> {kind, path}
    git: dict | None = None
    versions: dict = field(default_factory=dict)
    cross_encoder: bool = False  # a re-ranker (sentence-transformers CrossEncoder), not an embedder


def hub_name(name_or_path: str) -> str | None:
    """A Hub name as is; a local asset as its Hub name; any other local path: None."""
    local = Path(name_or_path).expanduser()
    if local.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        return assets.hub_name(local) if name_or_path else None
    return name_or_path


def dataset_name(origin: str) -> str | None:
    """A data source's origin (data.iter_rows: a local path, or `hub:org/name[/file]`) as a Hub name."""
    if origin.startswith("hub:"):
        return "/".join(origin[4:].split("/")[:2])
    return assets.hub_name(origin) if origin else None


def metadata(info: CardInfo, after: dict[str, float]) -> dict:
    meta: dict = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                  "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "train"]}
    if info.cross_encoder:
        meta.update(pipeline_tag="text-ranking", tags=["sentence-transformers", "cross-encoder", "reranker", "train"])
    base = hub_name(info.base_model)
    if base:
        meta["base_model"] = base
    datasets = sorted({d for d in (dataset_name(s.get("origin", "")) for s in info.data.values()) if d})
    if datasets:
        meta["datasets"] = datasets
    if after:
        meta["metrics"] = sorted({k.split("/", 1)[1] for k in after if "/" in k})
        results = []
        for task, spec in info.tasks.items():
            values = {k.split("/", 1)[1]: v for k, v in after.items() if k.split("/", 1)[0] == task}
            if not values:
                continue
            results.append({"task": {"type": KIND_TO_TASK.get(spec.get("kind"), str(spec.get("kind")))},
                            "dataset": {"name": task, "type": hub_name(str(spec.get("path", ""))) or task},
                            "metrics": [{"type": m, "value": round(float(v), 4)} for m, v in values.items()]})
        if results:
            meta["model-index"] = [{"name": info.name, "results": results}]
    return meta


def _table(before: dict[str, float] | None, after: dict[str, float], best: dict | None) -> list[str]:
    cols = ["metric", *(["before"] if before else []), "after", *(["change"] if before else []),
            *([f"best (step {best['step']})"] if best else [])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for k, v in after.items():
        row = [f"`{k}`"]
        if before:
            b = before.get(k)
            row.append(f"{b:.4f}" if b is not None else "-")
        row.append(f"{v:.4f}")
        if before:
            row.append(f"{v - b:+.4f}" if b is not None else "-")
        if best:
            bv = best["metrics"].get(k)
            row.append(f"{bv:.4f}" if bv is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _kv(d: dict) -> list[str]:
    return [f"- `{k}`: {v}" for k, v in d.items()]


def render(info: CardInfo, before: dict[str, float] | None, after: dict[str, float],
           best: dict | None = None) -> str:
    """The card's text. `best`: {"step", "metric", "metrics"} when a step was selected during training."""
    # the metadata's results are those of the model in this folder: the selected step's, when one was
    front = yaml.safe_dump(metadata(info, best["metrics"] if best else after), sort_keys=False,
                           allow_unicode=True, width=1000)
    usage = ["from sentence_transformers import CrossEncoder", "",
             'model = CrossEncoder("path/to/this/folder")',
             'scores = model.predict([("A man plays a guitar.", "Someone makes music.")])'] if info.cross_encoder else \
        ["from sentence_transformers import SentenceTransformer", "",
         'model = SentenceTransformer("path/to/this/folder")',
         'embeddings = model.encode(["A man plays a guitar.", "Someone makes music."])']
    what = "cross-encoder (re-ranker)" if info.cross_encoder else "model"
    lines = ["---", front.rstrip(), "---", "", f"# {info.name}", "",
             f"A sentence-transformers {what} trained with `train` (recipe `{info.recipe}`) from "
             f"`{info.base_model}`.", "", "## Usage", "", "```python", *usage, "```", "",
             "## How it was trained", "", f"Command: `{info.command}`", ""]
    if info.overrides:
        lines += ["| override | resolved |", "|---|---|"]
        lines += [f"| `{given}` | `{resolved}` |" for given, resolved in info.overrides]
        lines.append("")
    lines += ["Model:", "", *_kv(info.model), "", "Training:", "", *_kv(info.training), ""]
    lines += ["## Data", ""]
    if info.data:
        lines += ["| source | origin | records | fingerprint (run.json) |", "|---|---|---|---|"]
        for name, d in info.data.items():
            fingerprint = "; ".join(f"{k} `{v}`" for k, v in d.items() if k not in ("origin", "records"))
            lines.append(f"| {name} | `{d.get('origin', '')}` | {d.get('records', '')} | {fingerprint or '-'} |")
    else:
        lines.append("(no data record)")
    lines += ["", "## Evaluation", ""]
    if after:
        named = [f"`{t}`" + (f" (cut to its first {spec['limit']})" if spec.get("limit") else "")
                 for t, spec in info.tasks.items()]
        lines += [f"On {', '.join(named)}" + (f"; `model/` is the best step by `{best['metric']}`." if best else "."),
                  ""]
        lines += _table(before, after, best)
    else:
        lines.append("No evaluation tasks were configured (`eval=none`).")
    lines += ["", "## Versions", ""]
    if info.git:
        dirty = " (uncommitted changes)" if info.git.get("dirty") else ""
        lines.append(f"- code: git commit `{info.git.get('commit')}`{dirty}")
    lines += [f"- {k} {v}" for k, v in info.versions.items()]
    return "\n".join(lines) + "\n"
