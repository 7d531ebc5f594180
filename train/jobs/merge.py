"""job=merge: merge model folders (train/merge_folders.py), optionally searching the weights first.

    merge.search=none      write the merge with merge.weights (and evaluate it when eval.tasks is set)
    merge.search=grid      2-3 models: every point of the weight simplex with `grid_points` per edge
                           (5 -> 0, .25, .5, .75, 1) is merged, written to a scratch folder, loaded
                           and scored by the evaluators; the best is kept
    merge.search=gradient  any number of models, against merge.base: Self Positioning ("Improving
                           General Text Embedding Model: Tackling Task Conflict and Data Imbalance
                           through Model Merging") -- coefficients c of the task vectors, theta(c) = base +
                           sum_i c_i tau_i, trained by gradient descent on the contrastive loss over
                           a few batches of the `data` config (torch.func.functional_call puts
                           theta(c) into the model, so only c has a gradient); the evaluators then
                           rank c every `search_eval_every` steps and the final one

The score is sum_k weight_k * metric_k over `merge.objective` (default: each task's main
metric, sts -> spearman, retrieval -> ndcg@10, weight 1). Every candidate's metrics go to
stdout as a table and to <run dir>/merge_search.json; the best candidate is what is written.

Bounds: a grid holds one merged model at a time (plus the streamed tensors) and evaluates
C(n+k-2, n-1) candidates (2 models, 5 points: 5; 3 models: 15). The gradient search holds the
base, the n task vectors and the model, (n + 2) models' worth of memory, and costs
`search_steps` forward/backward passes on `search_batch_size` examples plus one evaluation per
`search_eval_every` steps.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

import torch

from train.atomic import replace_folder, write_json
from train.build import Merging
from train.dist import World
from train.embed import embedder
from train.errors import UserError
from train.evaluate import run_tasks, side_by_side
from train.gradcache import make_pairing
from train.log import say
from train.merge_folders import MergePlan, run_plan
from train.model import load_encoder, pad

MAIN_METRIC = {"StsTask": "spearman", "RetrievalTask": "ndcg@10"}


def simplex_grid(n: int, points: int) -> list[list[float]]:
    """Weights on the simplex with `points` values per edge: n=2, points=5 -> [0, 1], [.25, .75], ..."""
    steps = points - 1
    grid = [c for c in itertools.product(range(steps + 1), repeat=n) if sum(c) == steps]
    return [[x / steps for x in c] for c in sorted(grid, reverse=True)]


def objective_of(tasks: list, objective: dict[str, float]) -> dict[str, float]:
    if objective:
        names = {t.name for t in tasks}
        for key in objective:
            if key.split("/")[0] not in names:
                raise UserError(f"merge.objective: {key!r} names no evaluation task; expected "
                                f"<task>/<metric> with a task among {', '.join(sorted(names)) or '(none)'}")
        return dict(objective)
    return {f"{t.name}/{MAIN_METRIC[type(t).__name__]}": 1.0 for t in tasks}


def score(metrics: dict[str, float], objective: dict[str, float]) -> float:
    missing = [k for k in objective if k not in metrics]
    if missing:
        raise UserError(f"merge.objective: no metric {missing[0]!r}; the tasks report {', '.join(metrics)}")
    return sum(w * metrics[k] for k, w in objective.items())


def evaluate_folder(folder: Path, tasks: list, world: World, batch_size: int) -> dict[str, float]:
    encoder = load_encoder(str(folder)).to(world.device).eval()
    return run_tasks(tasks, embedder(encoder, world, batch_size))


def table(rows: list[dict], objective: dict[str, float]) -> str:
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    head = ["#", "weights"] + metrics + ["score"]
    lines = [head]
    for i, r in enumerate(rows):
        lines.append([str(i), "[" + ", ".join(f"{w:.3g}" for w in r["weights"]) + "]"]
                     + [f"{r['metrics'][m]:.4f}" for m in metrics] + [f"{r['score']:.4f}"])
    widths = [max(len(row[j]) for row in lines) for j in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    best = max(range(len(rows)), key=lambda i: rows[i]["score"])
    out.append(f"best: #{best} (score = {' + '.join(f'{w:g} x {k}' for k, w in objective.items())})")
    return "\n".join(out)


class Candidates:
    """Merge, write, evaluate; keep the best folder at `out`, drop the others."""

    def __init__(self, plan: MergePlan, out: Path, scratch: Path, tasks: list, objective: dict, world: World,
                 shard_mb: int, eval_batch_size: int):
        self.plan, self.out, self.scratch, self.tasks, self.objective = plan, out, scratch, tasks, objective
        self.world, self.shard_mb, self.eval_batch_size = world, shard_mb, eval_batch_size
        self.rows: list[dict] = []
        self.best: Path | None = None

    def try_weights(self, weights: list[float], note: str = "") -> dict:
        t = time.perf_counter()
        self.plan.how.weights = [float(w) for w in weights]
        folder = run_plan(self.plan, self.scratch / f"candidate-{len(self.rows)}", self.shard_mb)
        metrics = evaluate_folder(folder, self.tasks, self.world, self.eval_batch_size)
        row = {"weights": self.plan.how.weights, "metrics": metrics, "score": score(metrics, self.objective),
               "note": note, "seconds": round(time.perf_counter() - t, 1)}
        self.rows.append(row)
        say(f"candidate {len(self.rows) - 1}{' ' + note if note else ''}: weights "
            f"[{', '.join(f'{w:.3g}' for w in weights)}] -> score {row['score']:.4f} "
            f"({', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k in self.objective)})")
        if self.best is None or row["score"] > max(r["score"] for r in self.rows[:-1]):
            if self.best is not None:
                shutil.rmtree(self.best, ignore_errors=True)
            self.best = folder
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return row

    def finish(self, run_dir: Path, method: str) -> dict:
        best = max(range(len(self.rows)), key=lambda i: self.rows[i]["score"])
        replace_folder(self.best, self.out)  # the scratch folder sits next to `out`: a rename, not a copy
        shutil.rmtree(self.scratch, ignore_errors=True)
        print(table(self.rows, self.objective), flush=True)
        report = {"method": method, "objective": self.objective, "candidates": self.rows, "best": best,
                  "out": str(self.out)}
        write_json(run_dir / "merge_search.json", report)
        return report


def run(job: Merging, world: World, run_dir: Path) -> dict:
    """job=merge (see the module docstring); single process."""
    m, plan, out, tasks = job.settings, job.plan, job.out, job.tasks
    n = len(plan.models) if plan.adapters is None else len(plan.adapters)
    say(f"merging {n} {'adapters into ' + str(plan.base.path) if plan.adapters else 'models'} by "
        f"{plan.how.method}{' (search: ' + str(m.search) + ')' if m.search != 'none' else ''}; pipeline from "
        f"{plan.ref.label}")

    if m.search == "none":
        t = time.perf_counter()
        run_plan(plan, out, m.shard_mb)
        say(f"wrote {out} in {time.perf_counter() - t:.1f} s (weights {plan.how.weights})")
        result = {"out": str(out), "weights": plan.how.weights}
        if tasks:
            metrics = evaluate_folder(out, tasks, world, job.eval_batch_size)
            print(side_by_side(None, metrics), flush=True)
            write_json(run_dir / "eval.json", {"model": str(out), "metrics": metrics})
            result["metrics"] = metrics
        return result

    if not tasks:
        raise UserError(f"merge.search={m.search} needs evaluation tasks to score candidates: choose an eval "
                        "config (eval=snli) or set eval.tasks")
    objective = objective_of(tasks, dict(m.objective))
    scratch = out.parent / f".{out.name}.search"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cands = Candidates(plan, out, scratch, tasks, objective, world, m.shard_mb, job.eval_batch_size)
    try:
        if m.search == "grid":
            if not 2 <= n <= 3:
                raise UserError(f"merge.search=grid covers 2 or 3 models, merge.models has {n}; "
                                "use merge.search=gradient")
            if m.grid_points < 2:
                raise UserError(f"merge.grid_points={m.grid_points}: expected at least 2")
            for w in simplex_grid(n, m.grid_points):
                cands.try_weights(w)
        else:
            gradient_search(job, cands, world)
        return cands.finish(run_dir, plan.how.method)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def coefficient_loss(encoder, base: dict, taus: list[dict], coef: torch.Tensor, batch, loss_fn,
                     mask_duplicates: bool) -> torch.Tensor:
    """The contrastive loss of one batch at theta(c) = base + sum_i c_i tau_i, differentiable in c
    alone: functional_call runs the encoder on theta(c) without touching its own parameters."""
    from torch.func import functional_call

    device = coef.device
    params = {k: base[k] + sum(coef[i] * tau[k] for i, tau in enumerate(taus)) for k in base}

    def forward(ids: list[list[int]]) -> torch.Tensor:
        input_ids, mask = pad(ids, encoder.pad_id, encoder.left_pad)
        return functional_call(encoder, params, (input_ids.to(device), mask.to(device)))

    q, p = forward(batch.query_ids), forward(batch.passage_ids)  # [b, D], [b*(1+n), D]
    return loss_fn(make_pairing(q, p, batch, mask_duplicates, World(device=device)))


def gradient_search(job: Merging, cands: Candidates, world: World) -> None:
    """Self Positioning: learn task-vector coefficients on the contrastive loss, let the evaluators rank."""
    from train.data import collate

    m, plan = job.settings, job.plan
    if plan.how.method != "task_arithmetic" or plan.base is None:
        raise UserError("merge.search=gradient learns task-arithmetic coefficients: set "
                        "merge.method=task_arithmetic and merge.base=<the models' starting point>")
    for key in ("search_steps", "search_batch_size", "search_eval_every"):
        if m[key] < 1:
            raise UserError(f"merge.{key}={m[key]}: expected a positive integer")
    sources, mixture = job.search_data()

    # theta(c) = base + sum_i c_i tau_i, parameter by parameter (names as the encoder has them)
    encoder = load_encoder(str(plan.ref.path)).to(world.device).eval()  # dropout off: a deterministic loss
    base, taus = task_vector_params(encoder, plan.base.path, [f.path for f in plan.models], world.device)
    n = len(taus)
    coef = torch.full((n,), 1.0 / n, device=world.device, requires_grad=True)
    opt = torch.optim.Adam([coef], lr=m.search_lr)

    cands.try_weights(coef.tolist(), "(start: uniform)")
    for step in range(1, m.search_steps + 1):
        batch = collate(sources, mixture.next_batch(), encoder.tokenize)
        loss = coefficient_loss(encoder, base, taus, coef, batch, job.loss_fn, job.mask_duplicates)
        opt.zero_grad()
        loss.backward()
        opt.step()
        say(f"search step {step}/{m.search_steps}: loss {loss.item():.4g}, coefficients "
            f"[{', '.join(f'{c:.3f}' for c in coef.tolist())}]")
        if step % m.search_eval_every == 0 or step == m.search_steps:
            cands.try_weights(coef.tolist(), f"(step {step})")


def task_vector_params(encoder, base_path: Path, model_paths: list[Path], device) -> tuple[dict, list[dict]]:
    """(base parameters, [theta_i - base]) keyed as encoder.named_parameters(); (n + 1) models' worth."""
    names = [k for k, _ in encoder.named_parameters()]
    base = {k: v.detach().float() for k, v in load_encoder(str(base_path)).named_parameters()}
    taus = []
    for path in model_paths:
        params = dict(load_encoder(str(path)).named_parameters())
        taus.append({k: (params[k].detach().float() - base[k]).to(device) for k in names})
    return {k: base[k].to(device) for k in names}, taus
