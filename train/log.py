"""Metrics out: stdout (rank 0), `<run dir>/metrics.jsonl`, and wandb when asked.

wandb is off unless `log.wandb=true`, and then offline unless `log.wandb_mode=online`:
an online init without network hangs for minutes, so it is never the default.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from train.atomic import write_text


def say(msg: str) -> None:
    print(f"train: {msg}", file=sys.stderr, flush=True)


class Logger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, config: dict | None = None,
                 wandb: bool = False, wandb_project: str = "train", wandb_mode: str = "offline",
                 progress: bool = True):
        self.enabled, self.total = enabled, total_steps
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.wandb = None
        if enabled and wandb and wandb_mode != "disabled":
            import wandb as wb

            self.wandb = wb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config)
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)
        self.t0, self.first = time.perf_counter(), 0

    def start(self, step: int = 0) -> None:
        """Training starts now, after `step` steps (a resumed run): the ETA counts from here, not from
        model loading or evaluation."""
        self.t0, self.first = time.perf_counter(), step
        if self.bar is not None:
            self.bar.update(step)

    def rewind(self, step: int) -> None:
        """A run resumed after `step`: drop the records the stopped run wrote past it (they are redone)."""
        if not self.enabled:
            return
        self.file.close()
        path = Path(self.file.name)
        kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text(path, "".join(kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            flat.update({f"eval/{k}": v for k, v in record.get("eval", {}).items()})
            self.wandb.log(flat, step=record.get("step"))

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def train_step(self, step: int, record: dict, show: bool) -> None:
        """One optimizer step: to the file always, to the terminal every `show`."""
        if not self.enabled:
            return
        self.write(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        if show:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, step - self.first) * (self.total - step)
            self.print(f"step {step}/{self.total}  loss {record['loss']:.4g}  lr {record['lr']:.2e}  "
                       f"grad_norm {record['grad_norm']:.3g}  {record['examples_per_s']:.1f} ex/s  "
                       f"{record['padded_tokens_per_text']:.1f} tok/text ({record['real_tokens_per_text']:.1f} real)  "
                       f"ETA {eta / 60:.1f} min")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
