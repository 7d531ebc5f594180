"""Checkpoints that a run continues from exactly, written so that a crash never leaves one that looks valid.

    <run dir>/checkpoints/step-00000120/
        trainer.json        step, data position of every source, starting metrics, the settings that
                            must not change on resume, and the size of every file below (written last)
        state.pt            model + optimizer + schedule (one process / DDP: rank 0 writes it)
        dcp/                FSDP2: torch.distributed.checkpoint shards, one set per rank
        deepspeed/          DeepSpeed: its own engine checkpoint (ZeRO partitions per rank)
        rng-rank<r>.pt      each rank's python / numpy / torch / CUDA generator states

Atomic: every rank writes into `checkpoints/.tmp-step-...`, rank 0 writes trainer.json last, fsyncs every
file and the folder, renames it to `step-...` (one rename on one filesystem) and fsyncs `checkpoints/`,
and only then deletes checkpoints beyond `keep_last`. A crash mid-write leaves a `.tmp-` folder that is
never read and is removed by the next save. On load, a checkpoint whose files are missing or of the
wrong size, or that fails to load, is skipped with a warning for the one before it.

Lineage: a run resumed from step k continues from k, so checkpoints newer than k (a corrupt one it fell
back past, or the later steps of a run resumed from an earlier checkpoint on purpose) belong to a line
this run no longer follows. They are renamed aside to `abandoned-step-N-resumed-at-K`, which no resume
and no pruning sees, and deleted only once the new line has a good checkpoint at step N or later.

The dropout streams are part of the state: the gradient cache replays each chunk from the RNG state
it saved, so restoring the generators (with the sampler position) makes a resumed run bit-identical
to one that never stopped (tests/test_resume.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.atomic import fsync_path, fsync_tree, replace_folder, write_json
from train.errors import UserError

STEP_DIR = re.compile(r"^step-(\d{8})$")
ABANDONED_DIR = re.compile(r"^abandoned-step-(\d{8})-")

# Settings a checkpoint's optimizer state, schedule and data position were made under: resuming with
# any of them changed would silently train something else, so it is refused, naming the key.
IDENTITY_KEYS = ("seed", "model", "data", "loss", "optim", "trainer.batch_size", "trainer.accum_steps",
                 "trainer.max_steps", "trainer.schedule", "trainer.warmup_ratio", "trainer.max_grad_norm",
                 "dist.strategy", "dist.zero_stage", "world_size")


DATA_FILE = "data_file."  # identity keys of the data files' fingerprints (record.data_identity)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def listed(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under `root`, oldest first (temp folders are never listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def identity(cfg: dict, world_size: int) -> dict[str, Any]:
    """The IDENTITY_KEYS of a resolved config, flattened to dotted keys."""
    out: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        if key == "world_size":
            out[key] = world_size
            continue
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.update(flatten(node, key))
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"trainer": {"batch_size": 64}} -> {"trainer.batch_size": 64}."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def check_compatible(path: Path, saved: dict, now: dict) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming the first difference."""
    for key in sorted(set(saved) | set(now)):
        if key == "world_size" and saved.get(key) != now.get(key):
            # The global batch and the sampler do not depend on the world size. One process's or DDP's
            # state is whole (rank 0 wrote it); FSDP2's is saved by torch.distributed.checkpoint, whose
            # load reshards it onto the new mesh. ZeRO's partitions are laid out per rank.
            if now.get("data.streaming"):
                raise UserError(f"cannot resume from {path} on {now[key]} ranks: it was written on {saved.get(key)} "
                                "ranks with data.streaming=true, whose streams are split per rank and read to a "
                                f"position each; resume on {saved.get(key)} ranks")
            if now.get("dist.strategy") == "deepspeed":
                raise UserError(f"cannot resume from {path} on {now[key]} ranks: it was written by "
                                f"dist.strategy=deepspeed on {saved.get(key)} ranks, whose state is sharded per "
                                f"rank; resume on {saved.get(key)} ranks, or convert it with DeepSpeed's universal "
                                "checkpoint (deepspeed/checkpoint/ds_to_universal.py), which this trainer does "
                                "not load")
            continue
        if key.startswith(DATA_FILE):
            if key in saved and key in now and saved[key] != now[key]:  # older checkpoints recorded none
                raise UserError(f"cannot resume from {path}: the data file of source {key[len(DATA_FILE):]!r} "
                                f"changed since the checkpoint was written (then: {saved[key]}; now: {now[key]}); "
                                "put the file back, or start a fresh run dir")
            continue
        if saved.get(key) != now.get(key):
            raise UserError(f"cannot resume from {path}: it was written with {key}={saved.get(key)!r}, this run "
                            f"has {key}={now.get(key)!r}; change it back, or start a fresh run dir "
                            "(trainer.resume=null with another hydra.run.dir)")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def verify(folder: Path) -> dict:
    """trainer.json of a finished checkpoint whose files are all there at their recorded sizes."""
    try:
        meta = json.loads((folder / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"trainer.json unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files", {}), dict):
        raise ValueError("trainer.json is not a checkpoint's record")
    for name, size in meta.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise ValueError(f"{name} is missing")
        if p.stat().st_size != size:
            raise ValueError(f"{name} has {p.stat().st_size} bytes, {size} were written")
    return meta


def temp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step:08d}"


def prepare(root: Path, step: int, is_main: bool) -> Path:
    """Rank 0 clears leftovers of crashed saves and makes the temp folder (the caller then barriers)."""
    tmp = temp_dir(root, step)
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for p in root.glob(".tmp-step-*"):
                shutil.rmtree(p, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot write a checkpoint in {root}: {e}") from None
    return tmp


def finish(root: Path, tmp: Path, step: int, meta: dict, keep_last: int) -> Path:
    """Rank 0, after every rank wrote its part: trainer.json last, fsync, rename, then prune old ones."""
    final = step_dir(root, step)
    try:
        meta = {**meta, "files": file_sizes(tmp)}
        write_json(tmp / "trainer.json", meta, indent=1)
        fsync_tree(tmp)  # every rank's files on disk before the name says the checkpoint is complete
        replace_folder(tmp, final)  # the same step saved again: the old one goes only once the new one is in
        fsync_path(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {e}; the previous checkpoints are untouched") from None
    if keep_last > 0:
        for _, old in listed(root)[:-keep_last]:  # the current lineage only: abandoned ones are not listed
            shutil.rmtree(old, ignore_errors=True)
        for p in root.iterdir():  # abandoned checkpoints that the new lineage has now passed
            if (m := ABANDONED_DIR.match(p.name)) and int(m.group(1)) <= step:
                shutil.rmtree(p, ignore_errors=True)
    return final


def abandon_newer(root: Path, step: int) -> list[Path]:
    """Rank 0, once every rank resumed from `step`: rename this run dir's checkpoints newer than it
    aside (never delete them here), so that pruning and resume=auto follow the line now trained."""
    moved = []
    try:
        for s, p in listed(root):
            if s > step:
                dest = root / f"abandoned-{p.name}-resumed-at-{step:08d}"
                n = 1
                while dest.exists():
                    dest, n = root / f"abandoned-{p.name}-resumed-at-{step:08d}-{n}", n + 1
                os.replace(p, dest)
                moved.append(dest)
        if moved:
            fsync_path(root)
    except OSError as e:
        raise UserError(f"cannot set aside the checkpoints newer than step {step} in {root}: {e}") from None
    return moved


def candidates(resume: str | None, run_dir: Path) -> list[Path]:
    """trainer.resume -> checkpoint folders to try, newest first ([] for a fresh start).

    null: a fresh start, refused when the run dir already holds checkpoints (it would mix two runs);
    auto: this run dir's checkpoints, if any; PATH: a run dir, its checkpoints/ folder, or one step-* folder."""
    own = run_dir / "checkpoints"
    if resume is None:
        if listed(own):
            raise UserError(f"{run_dir} already holds checkpoints ({listed(own)[-1][1].name}); pass "
                            "trainer.resume=auto to continue that run, or choose another hydra.run.dir")
        return []
    if resume == "auto":
        return [p for _, p in reversed(listed(own))]
    p = Path(resume)
    for root in (p / "checkpoints", p):
        if listed(root):
            return [c for _, c in reversed(listed(root))]
    if STEP_DIR.match(p.name) and p.is_dir():
        return [p]
    raise UserError(f"trainer.resume={resume}: no checkpoint there; expected a run dir, its checkpoints/ "
                    "folder or a step-* folder")
