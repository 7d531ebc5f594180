"""`python -m train` end to end, as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["model=tiny_bert", "trainer.batch_size=16", "trainer.max_steps=3", "trainer.log_every=1",
        "data.limit=200", "eval.tasks.snli_sts.limit=100", "eval.tasks.snli_ir.limit=20",
        "eval.tasks.snli_ir.corpus_limit=300"]


def train(*args: str, torchrun: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(torchrun)] if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "train", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_quickstart_path_on_real_minilm_saves_a_sentence_transformers_model(tmp_path):
    from sentence_transformers import SentenceTransformer

    from train.embed import encode
    from train.model import load_encoder

    run = tmp_path / "run"
    out = train("trainer.max_steps=2", "trainer.batch_size=16", "trainer.chunk_size=4", "data.limit=64",
                "eval.tasks.snli_sts.limit=100", "eval.tasks.snli_ir.limit=20",
                "eval.tasks.snli_ir.corpus_limit=300", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 1" in out.stderr and "eval after training" in out.stderr
    summary = json.loads((run / "eval.json").read_text())
    assert set(summary["before"]) == set(summary["after"]) and "snli_sts/spearman" in summary["after"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 + 2  # 2 steps, 2 evaluations
    assert "trainer:" in (run / "config.yaml").read_text()

    card_is_the_runs_own(run, summary)

    texts = ["A soccer game with multiple males playing.", "Some men are playing a sport."]
    ours = load_encoder(str(run / "model")).eval()
    st = SentenceTransformer(str(run / "model"), device="cpu")
    assert torch.allclose(st.encode(texts, convert_to_tensor=True), encode(ours, texts, "query"), atol=1e-5)


def card_is_the_runs_own(run: Path, summary: dict) -> None:
    """model/README.md: sentence-transformers metadata, and the run's own figures, data
    fingerprints, overrides and versions, compared with the files the run wrote beside it."""
    import yaml

    text = (run / "model" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert (meta["library_name"], meta["pipeline_tag"]) == ("sentence-transformers", "sentence-similarity")
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["datasets"] == ["stanfordnlp/snli"]
    assert {"spearman", "ndcg@10"} <= set(meta["metrics"])
    results = {(r["dataset"]["name"], m["type"]): m["value"] for r in meta["model-index"][0]["results"]
               for m in r["metrics"]}
    assert results == {tuple(k.split("/")): round(v, 4) for k, v in summary["after"].items()}
    before, after = summary["before"]["snli_sts/spearman"], summary["after"]["snli_sts/spearman"]
    assert f"| `snli_sts/spearman` | {before:.4f} | {after:.4f} | {after - before:+.4f} |" in body
    record = json.loads((run / "run.json").read_text())
    fingerprint = {k: v for k, v in record["data"]["main"].items() if k not in ("origin", "records")}
    assert fingerprint and all(f"{k} `{v}`" in body for k, v in fingerprint.items())
    assert f"Command: `{record['command']}`" in body and "(recipe `quickstart`)" in body
    assert "| `data.limit=64` | `64` |" in body and f"- torch {torch.__version__}" in body


def test_eval_recipe_evaluates_a_saved_model(tmp_path):
    run = tmp_path / "train"
    assert train(*TINY, f"hydra.run.dir={run}").returncode == 0
    out = train("recipe=eval", f"model.path={run / 'model'}", "eval.tasks.snli_sts.limit=100",
                "eval.tasks.snli_ir.limit=20", "eval.tasks.snli_ir.corpus_limit=300",
                f"hydra.run.dir={tmp_path / 'eval'}")
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    trained = json.loads((run / "eval.json").read_text())["after"]
    assert metrics == pytest.approx(trained, abs=1e-4)  # the same model, the same figures


def test_a_run_without_deepspeed_neither_imports_it_nor_prints_its_warnings(tmp_path):
    """DeepSpeed, once imported, picks an accelerator and on a CPU machine warns about it in every
    run; only a DeepSpeed strategy may import it. DS_ACCELERATOR is unset, as on a user's machine
    (conftest sets it for the DeepSpeed tests), and the run is the quickstart's shape, saving included."""
    script = ("import sys, runpy; sys.argv = ['train', *sys.argv[1:]]\n"
              "try:\n    runpy.run_module('train', run_name='__main__')\n"
              "finally:\n    print('deepspeed imported:', 'deepspeed' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", script, *TINY[:5], "eval=none", f"hydra.run.dir={tmp_path}"],
                         env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert "real_accelerator" not in out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout + out.stderr
    assert "deepspeed imported: False" in out.stdout


def test_importing_any_module_of_the_package_leaves_deepspeed_unimported():
    script = ("import importlib, pkgutil, sys, train\n"
              "names = [m.name for m in pkgutil.walk_packages(train.__path__, 'train.')\n"
              "         if not m.name.endswith('__main__')]  # entry points run when imported\n"
              "for name in names:\n    importlib.import_module(name)\n"
              "print(len(names), 'deepspeed' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    count, imported = out.stdout.split()
    assert int(count) > 10 and imported == "False"


PAIR = b'{"anchor": "a", "positive": "b"}\n'
LATIN1 = b'{"anchor": "caf\xe9", "positive": "b"}\n'  # "cafe" with its accent in Latin-1, not UTF-8


def write(path: Path, content: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return str(path)


def tiny_bert_copy(t: Path, name: str | None = None, content: bytes = b"") -> None:
    """t/model_copy: the tiny BERT folder; `name` given: that file replaced, or cut in half when
    content is empty (an interrupted copy)."""
    import shutil

    from train import assets

    folder = t / "model_copy"
    shutil.copytree(assets.path("tiny-bert"), folder)
    if name:
        f = folder / name
        f.write_bytes(content or f.read_bytes()[: f.stat().st_size // 2])


# (overrides, with {t} for the temp folder; files to write under it, or a function that prepares it;
#  what the one error line must say). All fail before training, most before any model loads.
BAD_INPUTS = [
    # data files
    (["data.path={t}/latin1.jsonl"], {"latin1.jsonl": PAIR + LATIN1},
     "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"),
    (["data.path={t}/latin1.csv"], {"latin1.csv": b"anchor,positive\na,b\ncaf\xe9,b\n"},
     "latin1.csv:3: not UTF-8 text"),
    (["data.path={t}/latin1.txt"], {"latin1.txt": b"one sentence\ncaf\xe9 two\n"}, "latin1.txt:2: not UTF-8 text"),
    (["data.path=/nonexistent/train.jsonl"], {}, "/nonexistent/train.jsonl: no such data file"),
    (["data.path={t}/bad.jsonl"], {"bad.jsonl": PAIR + b'{"anchor": "a"\n'}, "bad.jsonl:2: invalid JSON"),
    (["data.path={t}/list.jsonl"], {"list.jsonl": PAIR + b"[1, 2]\n"}, "list.jsonl:2: expected a JSON object"),
    (["data.path={t}/missing.jsonl"], {"missing.jsonl": PAIR + b'{"anchor": "c"}\n'},
     'missing.jsonl:2: missing field "positive"'),
    (["data.path={t}/number.jsonl"], {"number.jsonl": PAIR + b'{"anchor": 5, "positive": "b"}\n'},
     'number.jsonl:2: field "anchor" must be text'),
    (["data.path={t}/scores.jsonl"], {"scores.jsonl": b'{"anchor": "a", "positive": "b", "scores": ["high"]}\n'},
     'scores.jsonl:1: field "scores" must hold numbers'),
    (["data.path={t}/empty.jsonl"], {"empty.jsonl": b""}, "empty.jsonl: the dataset is empty"),
    (["data.path={t}/object.json"], {"object.json": b'{"anchor": "a"}'}, "object.json: expected a JSON list"),
    (["data.path={t}/garbage.parquet"], {"garbage.parquet": b"not a parquet file"},
     "data source 'main' ({t}/garbage.parquet): ArrowInvalid"),
    (["data.limit=10"], {}, "trainer.batch_size=16 is larger than the 10 examples"),
    # evaluation files
    (["eval.tasks.snli_sts.path=/nonexistent/sts.jsonl"], {}, "/nonexistent/sts.jsonl: no such STS file"),
    (["eval.tasks.snli_sts.path={t}/sts.jsonl"], {"sts.jsonl": b'{"sentence1": "caf\xe9"}\n'},
     "sts.jsonl:1: not UTF-8 text"),
    # values a library checks
    (["optim.lr=-1"], {}, "optim.lr=-1.0: refused by torch.optim.AdamW (Invalid learning rate: -1.0)"),
    (["optim.weight_decay=-0.1"], {}, "optim.weight_decay=-0.1: refused by torch.optim.AdamW"),
    (["optim.betas=[1.5,0.999]"], {}, "optim.betas=(1.5, 0.999): refused by torch.optim.AdamW"),
    (["optim.eps=-1"], {}, "optim.eps=-1.0: refused by torch.optim.AdamW"),
    (["optim._target_=torch.optim.NoSuchOptimizer"], {}, "optim._target_=torch.optim.NoSuchOptimizer: "),
    (["trainer.warmup_ratio=1.5"], {}, "trainer.warmup_ratio=1.5: expected a share of the steps, from 0 to 1"),
    (["trainer.max_steps=0"], {}, "trainer.max_steps=0: expected a positive integer"),
    (["trainer.chunk_size=0"], {}, "trainer.chunk_size=0: expected a positive integer"),
    (["trainer.save_every=-1"], {}, "trainer.save_every=-1: expected 0 or a positive integer"),
    (["loss.temperature=0"], {}, "loss.temperature=0.0: expected a positive number"),
    # model folders
    (["model.path={t}/model_copy"], lambda t: tiny_bert_copy(t, "model.safetensors"),
     "{t}/model_copy/model.safetensors is truncated or corrupt"),
    (["model.path={t}/model_copy"], lambda t: tiny_bert_copy(t, "config.json", b"{not json"),
     "model.path={t}/model_copy: "),
    (["model.path=/nonexistent/model"], {}, "model.path=/nonexistent/model: no such model folder"),
    (["model.path=some-org/not-cached-model"], {}, "the Hugging Face Hub could not provide it"),
    # DeepSpeed JSON
    (["dist=deepspeed_zero2", "dist.deepspeed_config={t}/ds.json"], {"ds.json": b'{"zero_optimization": {,}}'},
     "dist.deepspeed_config: {t}/ds.json:1: invalid JSON"),
    (["dist=deepspeed_zero2", "dist.deepspeed_config={t}/ds.json"], {"ds.json": b"[1]"},
     "dist.deepspeed_config: {t}/ds.json: expected a JSON object"),
    # checkpoints
    (["trainer.resume=/nonexistent/run"], {}, "trainer.resume=/nonexistent/run: no checkpoint there"),
    (["trainer.resume={t}/old/checkpoints/step-00000002"], {"old/checkpoints/step-00000002/trainer.json": b"[1]"},
     "trainer.resume: none of the checkpoints loads"),
]


def main_in_process(args: list[str], monkeypatch) -> tuple[int, str]:
    """`python -m train ARGS` through its entry point, in this process: (exit status, stderr)."""
    import contextlib
    import io

    from train.__main__ import main

    monkeypatch.setattr(sys, "argv", ["train", *args])
    monkeypatch.delenv("TRAIN_RUN_STAMP", raising=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    os.environ.pop("TRAIN_RUN_STAMP", None)
    return code, err.getvalue()


@pytest.mark.parametrize("overrides, files, message", BAD_INPUTS, ids=[f"{i:02d}" for i in range(len(BAD_INPUTS))])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, overrides, files, message):
    if callable(files):
        files(tmp_path)
    else:
        for name, content in files.items():
            write(tmp_path / name, content)
    run = tmp_path / "run"
    code, err = main_in_process([*TINY, *(o.format(t=tmp_path) for o in overrides), f"hydra.run.dir={run}"],
                                monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert message.format(t=tmp_path) in lines[-1]
    assert not (run / "model").exists() and not (run / "checkpoints").exists()


def test_bad_input_as_a_process_exits_2_with_one_line(tmp_path):
    """The same boundary seen from outside: a real `python -m train` process."""
    data = write(tmp_path / "latin1.jsonl", PAIR + LATIN1)
    out = train(*TINY, f"data.path={data}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"error: {data}:2: not UTF-8 text (byte 0xe9 at column 16); "
                                                   "expected a UTF-8 encoded file")


def test_a_chunk_larger_than_the_batch_means_no_caching(tmp_path, monkeypatch):
    """quickstart's chunk_size=16 with trainer.batch_size=8 on the command line: not an error."""
    code, err = main_in_process(["model=tiny_bert", "trainer.batch_size=8", "trainer.max_steps=1", "data.limit=64",
                                 "eval=none", f"hydra.run.dir={tmp_path}"], monkeypatch)
    assert code == 0, err[-3000:]
    assert "chunk 8 (no caching: trainer.chunk_size=16 holds the whole per-rank batch)" in err
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_unknown_recipe_fails_naming_it(tmp_path):
    out = train("recipe=nope", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "Could not find 'recipe/nope'" in out.stderr and "quickstart" in out.stderr


STRATEGIES = ["ddp", "fsdp2", "deepspeed_zero3"]


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The same 3-step run under each strategy on 2 ranks (torchrun)."""
    runs = {}
    for dist_cfg in STRATEGIES:
        root = tmp_path_factory.mktemp(dist_cfg)
        # padded chunks under every strategy (auto packs DDP on CPU, not FSDP2/ZeRO): the same forwards
        # and dropout masks, so the strategies' weights can be compared
        out = train(*TINY, f"dist={dist_cfg}", "trainer.chunk_size=4", "optim.lr=1e-3", "trainer.packing=off",
                    f"hydra.run.dir={root}/run", torchrun=2, timeout=900)
        runs[dist_cfg] = (root, out)
    return runs


@pytest.mark.parametrize("dist_cfg", STRATEGIES)
def test_two_rank_runs_share_one_run_dir_and_save_a_loadable_model(two_rank_runs, dist_cfg):
    from train.model import load_encoder

    root, out = two_rank_runs[dist_cfg]
    assert out.returncode == 0, out.stderr[-4000:]
    assert "world size 2" in out.stderr
    assert [p.name for p in root.iterdir()] == ["run"]
    assert len((root / "run" / "metrics.jsonl").read_text().splitlines()) == 3 + 2  # rank 0 alone writes
    assert load_encoder(str(root / "run" / "model")).dim == 32


def test_every_strategy_trains_and_saves_the_same_model(two_rank_runs):
    """Same data, seeds and dropout masks: FSDP2 must end with DDP's weights, and ZeRO-3 with
    DDP's up to its own reduction and optimizer arithmetic (and so the saved folders must hold
    the gathered, trained weights, not shards or stale copies)."""
    from safetensors.torch import load_file

    from train import assets

    weights = {name: load_file(str(root / "run" / "model" / "model.safetensors"))
               for name, (root, _) in two_rank_runs.items()}
    initial = load_file(str(assets.path("tiny-bert") / "model.safetensors"))
    ddp = weights["ddp"]

    def norm(tensors: dict) -> float:
        return float(sum(t.double().pow(2).sum() for t in tensors.values()) ** 0.5)

    moved = norm({k: ddp[k] - initial[k] for k in ddp})
    assert moved > 1e-2  # training changed the weights (lr 1e-3, 3 steps)
    # Measured on a 2-core CPU with these runs, twice: FSDP2 0 (bit-identical to DDP),
    # ZeRO-3 8.0e-6 of the update's norm (largest entry 1.7e-6). Relative to the whole update, not
    # per tensor: AdamW divides by sqrt(v), which magnifies last-digit differences of near-zero
    # gradients (rare embedding rows) into visible ones, entry by entry.
    for name, tolerance in (("fsdp2", 1e-6), ("deepspeed_zero3", 1e-4)):
        assert weights[name].keys() == ddp.keys()
        differ = norm({k: weights[name][k] - ddp[k] for k in ddp})
        assert differ < tolerance * moved, (name, differ, moved)


def test_a_batch_the_world_size_does_not_divide_is_refused_at_start(tmp_path):
    out = train(*TINY, "trainer.batch_size=15", f"hydra.run.dir={tmp_path}", torchrun=2, timeout=300)
    assert out.returncode != 0
    assert "trainer.batch_size=15 is not divisible by the world size 2" in out.stderr
    assert "Traceback" not in out.stderr.split("error:")[0]  # the ranks' own output: one line each


def test_accelerate_launch_runs_two_ranks(tmp_path):
    """accelerate only starts the processes; it must not leave each rank training alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate.yaml",
           "--num_processes", "2", "-m", "train", *TINY, "trainer.chunk_size=4",
           f"hydra.run.dir={tmp_path}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("world size 2") == 2  # each rank says so
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3 + 2
