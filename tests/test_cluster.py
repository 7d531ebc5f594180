"""Cluster plumbing without a cluster: sweeps and their report, srun-started ranks, the SLURM
launcher config, the DeepSpeed JSON files."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model=tiny_bert", "trainer.batch_size=16", "trainer.max_steps=2", "data.limit=200",
        "eval.tasks.snli_sts.limit=100", "eval.tasks.snli_ir.limit=20",
        "eval.tasks.snli_ir.corpus_limit=300", "trainer.progress=false"]


def test_a_local_sweep_runs_every_point_and_the_report_tables_and_plots_them(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "train", "-m", *TINY, "optim.lr=1e-5,1e-3", f"hydra.sweep.dir={sweep}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {p.name: json.loads((p / "eval.json").read_text())["after"] for p in sweep.iterdir() if p.is_dir()}
    assert sorted(runs) == ["0", "1"]

    report = subprocess.run([sys.executable, str(ROOT / "tools" / "sweep_report.py"), str(sweep),
                             "--metric", "snli_sts/spearman"], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [r["run"] for r in rows] == ["0", "1"] and [float(r["optim.lr"]) for r in rows] == [1e-5, 1e-3]
    assert "model.path" not in rows[0]  # only what differs between the runs is a column
    for r in rows:
        assert float(r["snli_sts/spearman"]) == pytest.approx(runs[r["run"]]["snli_sts/spearman"])
        last = [json.loads(x) for x in (sweep / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert float(r["final loss"]) == pytest.approx([x["loss"] for x in last if "loss" in x][-1])
    assert "| optim.lr |" in report.stdout and (sweep / "sweep.md").read_text() == report.stdout
    png = (sweep / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_sweep_report_refuses_a_folder_without_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "sweep_report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"{tmp_path}: no run dirs" in out.stderr


def test_sweep_report_without_matplotlib_writes_the_table_and_says_how_to_get_the_plot(tmp_path):
    """The README's install has no extras: matplotlib (the `sweep` extra) may be missing."""
    for i, lr in enumerate(["0.001", "0.01"]):  # written as YAML reads floats back
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.yaml").write_text(f"optim:\n  lr: {lr}\n")
        (run / "eval.json").write_text(json.dumps({"after": {"snli_sts/spearman": 0.5 + i / 10}}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0 - i}) + "\n")
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", hide, str(ROOT / "tools" / "sweep_report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if "pip install -e '.[sweep]'" in line]
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [float(r["optim.lr"]) for r in rows] == [0.001, 0.01] and rows[1]["snli_sts/spearman"] == "0.6"
    assert (tmp_path / "sweep.md").read_text() == out.stdout and not (tmp_path / "sweep.png").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_started_by_srun_join_one_group(tmp_path):
    """What launch/slurm.sbatch does: srun starts every rank itself; SLURM's variables become torch's."""
    run, port = tmp_path / "run", free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", TRAIN_FROM_SLURM="1", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                   SLURM_LOCALID=str(rank), SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TRAIN_RUN_STAMP="slurm-4242")
        procs.append(subprocess.Popen([sys.executable, "-m", "train", *TINY[:4], "eval=none", "trainer.chunk_size=4",
                                       f"hydra.run.dir={run}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert "world size 2 (rank 0" in results[0][1] and "world size 2 (rank 1" in results[1][1]
    assert (run / "model" / "model.safetensors").exists()


def test_from_slurm_refuses_a_task_that_srun_did_not_start(monkeypatch):
    from train import dist
    from train.errors import UserError

    for key in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TRAIN_FROM_SLURM", "1")
    with pytest.raises(UserError, match="SLURM_PROCID is not set"):
        dist.from_slurm()


def test_slurm_launcher_config_requeues_and_maps_ranks(compose):
    cfg = compose(["hydra/launcher=slurm"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    assert "export TRAIN_FROM_SLURM=1" in launcher.setup
    assert launcher.tasks_per_node == launcher.gpus_per_node


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_files_fit_the_trainer_batch_settings(stage):
    from train.engines import deepspeed_config

    path = ROOT / "launch" / f"deepspeed_zero{stage}.json"
    cfg = deepspeed_config(stage, per_rank_batch=32, world_size=4, max_grad_norm=1.0, bf16=True, user_file=str(path))
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_batch_size"] == 128 and cfg["train_micro_batch_size_per_gpu"] == 32
    assert json.loads(path.read_text())["train_batch_size"] == "auto"


def test_torchrun_script_passes_usr_signals_on_and_waits_its_grace_period(tmp_path):
    """launch/torchrun.sh's arguments as torchrun itself parses them: SIGUSR1/2 are passed on to the
    ranks (torchrun's default passes neither) and SIGKILL waits SHUTDOWN_TIMEOUT_S (default 120)."""
    from torch.distributed.run import get_args_parser

    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "NPROC": "2"}
    for extra, timeout in (({}, 120), ({"SHUTDOWN_TIMEOUT_S": "45"}, 45)):
        out = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "recipe=quickstart"], env={**env, **extra},
                             capture_output=True, text=True, timeout=60, check=True)
        args = get_args_parser().parse_args(out.stdout.splitlines())
        assert {"SIGTERM", "SIGUSR1", "SIGUSR2"} <= set(args.signals_to_handle.split(","))
        assert args.shutdown_timeout == timeout and args.nproc_per_node == "2"
        assert args.module and args.training_script == "train" and args.training_script_args == ["recipe=quickstart"]
