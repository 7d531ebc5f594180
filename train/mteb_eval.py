"""The `mteb` package (2.x) on this project's encoder: tasks by name or benchmark, results in
mteb's own layout, and a summary (main score per task, averages per task type).

The model mteb sees is an `Embed` (the one sharded embedding pass, train/embed.py, built by the
caller), so the encoding is shared by the ranks like every other evaluation and this module knows
nothing of processes. mteb's prompt types map onto the encoder's prompt sides: query -> "query",
document -> "passage", none (symmetric tasks: STS, classification, clustering) -> "query", as the
built-in STS task embeds both sentences. With `instructions`, query-side texts also get the task's
mteb instruction through the encoder's instruction template (E5-Mistral, arXiv 2401.00368:
instructions on the query side only).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import numpy as np

from train.errors import UserError

SIDES = {"query": "query", "document": "passage"}


def _mteb():
    try:
        import mteb
    except ImportError as e:
        raise UserError("eval.mteb needs the mteb package: pip install -c constraints.txt -e '.[mteb]'") from e
    return mteb


def mock_tasks() -> dict[str, type]:
    """mteb's offline mock tasks (mteb.mocks) with text only, by their task name."""
    import inspect

    from mteb.mocks import mock_tasks as mocks

    found = {}
    for _, cls in inspect.getmembers(mocks, inspect.isclass):
        meta = getattr(cls, "metadata", None)
        if meta is not None and getattr(meta, "name", None) and set(getattr(meta, "modalities", ["text"])) == {"text"}:
            found[meta.name] = cls
    return found


def _registry() -> list[str]:
    try:
        from mteb.get_tasks import _TASKS_REGISTRY  # the names get_task knows; not public API
        return list(_TASKS_REGISTRY)
    except ImportError:
        return [t.metadata.name for t in _mteb().get_tasks()]


def _close(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"close names: {', '.join(near)}" if near else "no close name"


def resolve(tasks: list[str], benchmark: str | None) -> list:
    """mteb task objects for `eval.mteb.tasks` names (mock tasks included) or a benchmark's."""
    mteb = _mteb()
    if bool(tasks) == bool(benchmark):
        raise UserError("eval=mteb: set one of eval.mteb.tasks=[NAME,...] or eval.mteb.benchmark=NAME")
    if benchmark:
        names = [b.name for b in mteb.get_benchmarks()]
        try:
            return list(mteb.get_benchmark(benchmark).tasks)
        except KeyError:
            raise UserError(f"eval.mteb.benchmark={benchmark!r}: not an mteb benchmark; "
                            f"{_close(benchmark, names)}") from None
    mocks, known, out = mock_tasks(), None, []
    for name in tasks:
        if name in mocks:
            out.append(mocks[name]())
            continue
        known = known or _registry()
        if name not in known:
            raise UserError(f"eval.mteb.tasks: {name!r} is not an mteb task; {_close(name, known + list(mocks))}")
        out.append(mteb.get_task(name))
    return out


def encoder_for(embed, name: str, instructions: bool = False):
    """An mteb encoder over `embed(texts, side, instruction=...)`."""
    _mteb()  # the one-line refusal when mteb is missing
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta

    class Encoder(AbsEncoder):
        def __init__(self):
            self.mteb_model_meta = ModelMeta.create_empty({"name": name, "revision": "local"})

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            side = SIDES.get(getattr(prompt_type, "value", None), "query")
            instruction = None
            if instructions and side == "query":
                instruction = self.get_task_instruction(task_metadata, prompt_type) or None
            emb = embed(texts, side, instruction=instruction) if instruction else embed(texts, side)
            return emb.float().cpu().numpy()

    return Encoder()


def evaluate(tasks: list, embed, name: str, out: Path | None, instructions: bool = False) -> list[dict]:
    """Run each task; results written under `out` (mteb's ResultCache layout: results/<model>/<revision>/
    <task>.json) when given. Returns one row per task: name, type, main score name, score."""
    mteb = _mteb()
    model = encoder_for(embed, name, instructions)
    cache = mteb.ResultCache(out) if out is not None else None
    rows = []
    for task in tasks:
        task_name = task.metadata.name
        try:
            result = mteb.evaluate(model, task, cache=cache, overwrite_strategy="always", show_progress_bar=False)
        except Exception as e:  # noqa: BLE001 - the Hub being off is the common cause; said in one line
            text = f"{type(e).__name__}: {e}"
            if "OfflineModeIsEnabled" in text or "Couldn't reach" in text or "offline" in text.lower():
                offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in
                           ("", "0")]
                verb = "are" if len(offline) > 1 else "is"
                setting = (f"{' and '.join(f'{v}=1' for v in offline)} {verb} set" if offline
                           else "the Hub is unreachable")
                raise UserError(f"eval.mteb: task {task_name} needs its data from the Hugging Face Hub, and "
                                f"{setting}: run it where the Hub is reachable (unset {', '.join(offline) or 'them'}) "
                                "or with the dataset already in the datasets cache") from e
            raise
        scores = [r.get_score() for r in result.task_results]
        rows.append({"task": task_name, "type": task.metadata.type, "main_score": task.metadata.main_score,
                     "score": float(np.mean(scores))})
    return rows


def summary(rows: list[dict]) -> dict:
    """Scores per task, averages per task type and over all tasks (the mean of the task scores)."""
    by_type: dict[str, list[float]] = {}
    for r in rows:
        by_type.setdefault(r["type"], []).append(r["score"])
    return {"tasks": rows, "by_type": {t: float(np.mean(v)) for t, v in by_type.items()},
            "mean": float(np.mean([r["score"] for r in rows])) if rows else None}


def table(s: dict) -> str:
    width = max([len(r["task"]) for r in s["tasks"]] + [len("average")] + [len(t) + 10 for t in s["by_type"]])
    lines = [f"{'task':<{width}}  {'type':<20} {'main score':<16} score"]
    lines += [f"{r['task']:<{width}}  {r['type']:<20} {r['main_score']:<16} {r['score']:.4f}" for r in s["tasks"]]
    lines += [f"{'average ' + t:<{width}}  {'':<20} {'':<16} {v:.4f}" for t, v in s["by_type"].items()]
    if s["mean"] is not None:
        lines.append(f"{'average':<{width}}  {'':<20} {'':<16} {s['mean']:.4f}")
    return "\n".join(lines)
