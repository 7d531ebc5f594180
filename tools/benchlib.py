"""What the benchmarks share: fresh-process workers, peak memory from /proc, the machine record.

Each benchmark runs every configuration in a fresh interpreter (its own file with --worker), so
one configuration's allocations, caches and imports cannot leak into the next one's figures.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# glibc's malloc raises its mmap threshold after large frees and then keeps freed memory in its
# heap: the peak RSS of a CPU run grows with the number of differently shaped allocations, though
# the live tensors do not. A fixed threshold returns large blocks to the kernel at once, so
# VmHWM follows what the process really holds.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB ("VmRSS:   123456 kB")."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak_kib() -> int:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; return that RSS in KiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def run_worker(script: str, job: dict, env: dict[str, str]) -> tuple[dict | None, list[str], int]:
    """Run `script --worker JOB` in a fresh interpreter; the worker writes its result to
    job["result"] (and may use job["tmp"]). Returns (result or None, last output lines, exit code)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        job = {**job, "result": str(result), "tmp": tmp}
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(job)],
                              capture_output=True, text=True, env={**os.environ, **env})
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        if proc.returncode != 0 or not result.exists():
            return None, tail, proc.returncode
        return json.loads(result.read_text()), tail, 0


def machine() -> dict:
    """Date, versions, CPU/GPU, threads and load: what a figure needs to be read later."""
    from importlib.metadata import version  # not the packages themselves: importing them takes seconds

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
        "sentence_transformers": version("sentence-transformers"), "cpu": cpu, "cores": os.cpu_count(),
        "mem_total_gib": int(mem.split()[1]) / 2**20, "torch_threads": torch.get_num_threads(), "device": "cpu",
        "load_average_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info.update(device="cuda", gpu=torch.cuda.get_device_name(0))
    return info
