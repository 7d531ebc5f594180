"""The run record: what it takes to know later exactly what a run dir holds.

`<run dir>/run.json` (rank 0, written atomically at every start, a resumed run appending to `starts`):
the command line, working directory, host, the code's git commit (and whether the tree had uncommitted
changes), Python and package versions, and one fingerprint per data source. The resolved config is
`config.yaml` beside it, metrics are `metrics.jsonl`, the model `model/`.

A data fingerprint hashes the records as read (anchor, positive, negatives, scores), so it identifies a
Hub dataset as well as a local file; local files also get their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from train.atomic import write_json
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_fingerprint(source) -> str:
    """blake2b over a source's records as read: the same data gives the same value wherever it came from."""
    h = hashlib.blake2b(digest_size=16)
    for i in range(len(source)):
        parts = [source.anchors[i], source.positives[i] if source.positives is not None else "",
                 *(source.negatives[i] if source.negatives else []),
                 *(map(repr, source.scores[i]) if source.scores is not None else [])]
        h.update("\x1f".join(parts).encode("utf-8") + b"\x1e")
    return h.hexdigest()


def data_fingerprints(sources) -> dict[str, dict]:
    out = {}
    for source in sources:
        entry = {"origin": source.origin, "records": len(source), "content_blake2b": content_fingerprint(source)}
        path = Path(source.path)
        if path.is_file():
            entry["sha256"] = file_sha256(path)
        out[source.name] = entry
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
