"""The run record: what it takes to know later exactly what a run dir holds.

`<run dir>/run.json` (rank 0, written atomically at every start, a resumed run appending to `starts`):
the command line, working directory, host, the code's git commit (and whether the tree had uncommitted
changes), Python and package versions, and one fingerprint per data source. The resolved config is
`config.yaml` beside it, metrics are `metrics.jsonl`, the model `model/`.

A data fingerprint is taken from a local file's metadata and sampled blocks (`data.fingerprint=full`: every
byte), a hub dataset's from `datasets`' own fingerprint: start-up never reads the corpus for it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from train import arrow_store
from train.atomic import write_json
from train.checkpoint import DATA_FILE
from train.config import ROOT

PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "hydra-core", "omegaconf", "datasets",
            "sentence-transformers", "safetensors", "tokenizers", "numpy", "wandb")


def git_state(where: Path = ROOT) -> dict | None:
    """{"commit", "dirty"} of the checkout the code runs from; None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode:
            return None
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def data_fingerprints(sources, full: bool = False) -> dict[str, dict]:
    """Per source: where it came from, its size, and for a local file its size, modification time and
    a blake2b of sampled blocks (full=True: of the whole file, which reads it all); a hub dataset carries
    the fingerprint `datasets` gave it. Nothing here reads the records, so it costs the same at any size."""
    out = {}
    for source in sources:
        entry = {"origin": source.origin, "records": None if source.streaming else len(source)}  # a stream's: unknown
        # the sampled fingerprint was taken when the source was read; full=True reads every byte now
        full_fp = arrow_store.fingerprint(source.path, True) if full and source.path is not None else None
        entry.update(full_fp or source.fingerprint or {})
        out[source.name] = entry
    return out


def data_identity(sources) -> dict[str, str]:
    """The local data files a checkpoint was trained on, for resume to refuse a changed one: size and
    sampled blocks, not the modification time (a copy or a `touch` is not a change)."""
    out = {}
    for source in sources:
        if source.path is not None:
            fp = source.fingerprint or arrow_store.fingerprint(source.path)
            digest = fp.get("blake2b") or fp["sampled_blake2b"]
            out[f"{DATA_FILE}{source.name}"] = f"{source.path}: {fp['size']:,} bytes, blake2b {digest}"
    return out


def write(run_dir: Path, data: dict | None, world_size: int, resumed_from: str | None) -> dict:
    """Write (or extend) run.json; returns the record."""
    path = run_dir / "run.json"
    starts = []
    if path.exists():
        try:
            starts = json.loads(path.read_text()).get("starts", [])
        except (OSError, json.JSONDecodeError):
            starts = []
    starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "cwd": os.getcwd(),
                   "host": socket.gethostname(), "world_size": world_size, "resumed_from": resumed_from,
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
    record = {"command": " ".join(["python -m train", *sys.argv[1:]]), "git": git_state(), "versions": versions(),
              "data": data, "starts": starts}
    write_json(path, record, indent=1)
    return record
