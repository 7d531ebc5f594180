"""Model merging: each method against hand-computed values or the library's own function, the
streaming driver on tiny model folders, the checks, and `python -m train recipe=merge`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train import merge_folders as folders
from train import merge_methods as methods
from train.errors import UserError


def weights_of(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_encoder_factory):
    """Three sentence-transformers folders of the tiny BERT: a base and two 'fine-tunes' (the base
    plus seeded noise), written by train.model as training writes them."""
    root = tmp_path_factory.mktemp("tiny_models")
    gen = torch.Generator().manual_seed(0)
    dirs = {}
    for name, noise in (("base", 0.0), ("a", 0.05), ("b", 0.05), ("c", 0.05)):
        enc = tiny_encoder_factory()
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen))
        dirs[name] = enc.save(root / name)
    return dirs


# --- methods on hand-made tensors ----------------------------------------------------------------


def test_weighted_average_of_two_equals_the_hand_computed_average():
    a, b = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 6.0, 0.0])
    # (1*a + 3*b) / 4 by hand
    assert torch.equal(methods.weighted_average([a, b], [1, 3]), torch.tensor([2.5, 5.0, -1.0]))


def test_ties_trims_elects_the_sign_and_averages_only_agreeing_values():
    t1 = torch.tensor([1.0, -2.0, 3.0, 0.0])
    t2 = torch.tensor([-3.0, 1.0, 1.0, 2.0])
    t3 = torch.tensor([1.0, -2.0, -1.0, 0.0])
    # signs of the sums [-1, -3, 3, 2] -> [-, -, +, +]; agreeing values: [-3], [-2, -2], [3, 1], [2]
    assert torch.equal(methods.elect_sign([t1, t2, t3], [1, 1, 1]), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    base = torch.tensor([10.0, 10.0, 10.0, 10.0])
    assert torch.equal(methods.ties(base, [t1, t2, t3], [1, 1, 1], density=1.0), torch.tensor([7.0, 8.0, 12.0, 12.0]))
    # trimming keeps the ceil(density * n) largest magnitudes of each task vector
    assert torch.equal(methods.trim(torch.tensor([0.1, -5.0, 2.0, -0.3]), 0.5), torch.tensor([0.0, -5.0, 2.0, 0.0]))
    # with density 0.25 only t1's 3, t2's -3 and t3's -2 (first of the tied -2, -1 ... by magnitude) survive
    trimmed = [methods.trim(t, 0.25) for t in (t1, t2, t3)]
    assert [int((t != 0).sum()) for t in trimmed] == [1, 1, 1]


def test_dare_with_drop_rate_zero_equals_linear_and_drops_at_the_given_rate():
    gen = torch.Generator().manual_seed(1)
    base, x, y = (torch.randn(50, generator=gen) for _ in range(3))
    method = methods.make_method("dare_linear", 2, [0.3, 0.7], has_base=True, drop_rate=0.0)
    want = methods.weighted_average([x, y], [0.3, 0.7])  # weights summing to 1: task arithmetic = average
    assert torch.allclose(method.merge("w", [x, y].__getitem__, 2, base), want, atol=1e-6)
    method = methods.make_method("dare_linear", 2, [1.0, 2.0], has_base=True, drop_rate=0.0, scale=0.5)
    want = base + 0.5 * (1.0 * (x - base) + 2.0 * (y - base))  # task arithmetic by hand
    assert torch.allclose(method.merge("w", [x, y].__getitem__, 2, base), want, atol=1e-6)
    dropped = methods.dare(torch.ones(100_000), 0.9, torch.Generator().manual_seed(2))
    assert dropped.unique().tolist() == pytest.approx([0.0, 10.0])  # survivors rescaled by 1 / (1 - p)
    assert abs((dropped == 0).float().mean().item() - 0.9) < 0.01


def test_slerp_gives_the_endpoints_and_the_great_circle_midpoint():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    assert torch.allclose(methods.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(methods.slerp(a, b, 1.0), b, atol=1e-6)
    mid = methods.slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))  # not the chord's (0.5, 0.5)


# --- folders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, extra", [("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 1.0}),
                                           ("dare_ties", {"drop_rate": 0.0}), ("slerp", {})])
def test_merging_identical_models_gives_that_model(tiny_models, tmp_path, method, extra):
    a = tiny_models["a"]
    base = str(tiny_models["base"]) if method in methods.NEEDS_BASE else None
    plan = folders.plan_merge([str(a), str(a)], method, base=base, **extra)
    out = folders.run_plan(plan, tmp_path / "out")
    want, got = weights_of(a), weights_of(out)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    for f in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json", "tokenizer.json"):
        assert (out / f).read_text() == (a / f).read_text()


def test_weighted_average_of_folders_loads_in_sentence_transformers(tiny_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    from train.embed import encode
    from train.model import load_encoder

    a, b = tiny_models["a"], tiny_models["b"]
    out = folders.run_plan(folders.plan_merge([str(a), str(b)], "linear", weights=[0.25, 0.75]), tmp_path / "m")
    wa, wb, got = weights_of(a), weights_of(b), weights_of(out)
    for k in wa:
        assert torch.allclose(got[k], 0.25 * wa[k] + 0.75 * wb[k], atol=1e-6), k
    # expected embeddings: model a's encoder with the averaged weights put in by hand
    ref = load_encoder(str(a)).eval()
    ref.backbone.load_state_dict({k: 0.25 * wa[k] + 0.75 * wb[k] for k in wa}, strict=False)
    texts = ["A man plays a guitar.", "Two dogs run."]
    st = SentenceTransformer(str(out), device="cpu")
    assert torch.allclose(st.encode(texts, convert_to_tensor=True), encode(ref, texts, "query"), atol=1e-5)


def test_dense_modules_are_merged_and_sharded_output_reads_back(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    from train import assets

    inputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        t = Transformer(str(assets.path("tiny-bert")))
        st = SentenceTransformer(modules=[t, Pooling(32, "mean"), Dense(32, 16), Normalize()], device="cpu")
        inputs.append(st.save(str(tmp_path / f"st{seed}")) or tmp_path / f"st{seed}")
    plan = folders.plan_merge([str(f) for f in inputs], "linear")
    out = folders.run_plan(plan, tmp_path / "merged", shard_mb=1)  # embeddings alone are 3.9 MB: several shards
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    d0, d1, dm = (weights_of(f / "2_Dense") for f in (*inputs, out))
    assert dm.keys() == d0.keys() and all(torch.allclose(dm[k], (d0[k] + d1[k]) / 2, atol=1e-6) for k in d0)
    # the sharded folder is itself a valid input: merging it with itself reproduces it
    again = folders.run_plan(folders.plan_merge([str(out), str(out)], "linear"), tmp_path / "again")
    a0 = SentenceTransformer(str(out), device="cpu").encode(["a test"], convert_to_tensor=True)
    a1 = SentenceTransformer(str(again), device="cpu").encode(["a test"], convert_to_tensor=True)
    assert a0.shape == (1, 16) and torch.allclose(a0, a1, atol=1e-6)


# --- refusals --------------------------------------------------------------------------------------


def test_mismatches_are_refused_naming_the_first_difference(tiny_models, tiny_encoder_factory, tmp_path):
    a = str(tiny_models["a"])
    cls = tiny_encoder_factory(pooling="cls").save(tmp_path / "cls")
    with pytest.raises(UserError, match=r"embedding pipeline: .*1_Pooling/config.json"):
        folders.plan_merge([a, str(cls)], "linear")
    folders.plan_merge([a, str(cls)], "linear", spec_from=0)  # an explicit choice of pipeline is accepted
    config = json.loads((tiny_models["b"] / "config.json").read_text())
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in tiny_models["b"].iterdir():
        if f.is_file():
            (wide / f.name).write_bytes(f.read_bytes())
    (wide / "1_Pooling").mkdir()
    (wide / "1_Pooling" / "config.json").write_bytes((tiny_models["b"] / "1_Pooling" / "config.json").read_bytes())
    (wide / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(UserError, match=r"architecture \(config.json\): intermediate_size is 128, expected 64"):
        folders.plan_merge([a, str(wide)], "linear")
    (wide / "config.json").write_text(json.dumps(config))
    (wide / "model.safetensors").write_bytes(b"\x00" * 10)  # a truncated download
    with pytest.raises(UserError, match=r"merge.models\[1\].*cannot read"):
        folders.plan_merge([a, str(wide)], "linear")
    (wide / "model.safetensors").unlink()
    shard = "model-00001-of-00002.safetensors"
    (wide / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(UserError, match=r"shard .*model-00001-of-00002.safetensors .* is missing"):
        folders.plan_merge([a, str(wide)], "linear")
    (wide / "config.json").unlink()
    with pytest.raises(UserError, match=r"merge.models\[1\] .*config.json is missing"):
        folders.plan_merge([a, str(wide)], "linear")
    tok = json.loads((tiny_models["b"] / "tokenizer.json").read_text())
    tok["model"]["vocab"]["[unused0]"] = len(tok["model"]["vocab"])
    (wide / "config.json").write_text(json.dumps(config))
    (wide / "model.safetensors.index.json").unlink()
    (wide / "model.safetensors").write_bytes((tiny_models["b"] / "model.safetensors").read_bytes())
    (wide / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match=r"merge.models\[1\] .* in its tokenizer: tokenizer.json: model is"):
        folders.plan_merge([a, str(wide)], "linear")
    with pytest.raises(UserError, match="needs merge.base"):
        folders.plan_merge([a, a], "ties")
    with pytest.raises(UserError, match="merge.weights has 3 values for 2"):
        folders.plan_merge([a, a], "linear", weights=[1, 1, 1])


@pytest.fixture(scope="module")
def minilm_finetune(tmp_path_factory, compose):
    """A model trained from the MiniLM asset by the quickstart recipe (1 step), as a user makes one."""
    from train.run import run

    root = tmp_path_factory.mktemp("minilm_finetune")
    run(compose(["trainer.max_steps=1", "trainer.batch_size=8", "trainer.chunk_size=4", "data.limit=16",
                 "eval=none", "optim.lr=1e-3"]), root)
    return root / "model"


def test_a_fine_tune_merges_with_its_own_base_and_keeps_the_pipelines_length(minilm_finetune, tmp_path):
    """MiniLM's folder omits pooling keys that sentence-transformers fills by default (and that our
    folders write): the same pipeline, so souping a fine-tune with its base is accepted."""
    from sentence_transformers import SentenceTransformer

    from train import assets

    base = assets.path("minilm")
    assert "pooling_mode_lasttoken" not in json.loads((base / "1_Pooling" / "config.json").read_text())
    plan = folders.plan_merge([str(base), str(minilm_finetune)], "linear")
    out = folders.run_plan(plan, tmp_path / "soup")
    wb, wf, got = weights_of(base), weights_of(minilm_finetune), weights_of(out)
    assert any(not torch.equal(wb[k], wf[k]) for k in wf)  # the fine-tune moved
    for k in wf:  # the base also holds an integer buffer (position_ids), copied as it is
        assert torch.allclose(got[k], (wb[k] + wf[k]) / 2, atol=1e-6), k
    assert SentenceTransformer(str(out), device="cpu").max_seq_length == 256  # MiniLM's, not the training 32
    # a pipeline taken from one model keeps that model's length
    short = tmp_path / "short"
    shutil.copytree(minilm_finetune, short)
    (short / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    for i, want in ((0, 256), (1, 64)):
        plan = folders.plan_merge([str(base), str(short)], "linear", spec_from=i)
        out = folders.run_plan(plan, tmp_path / f"s{i}")
        assert SentenceTransformer(str(out), device="cpu").max_seq_length == want


def test_a_really_different_pooling_is_refused_naming_the_keys_and_both_values(minilm_finetune, tmp_path):
    from train import assets

    base = assets.path("minilm")
    other = tmp_path / "other"
    shutil.copytree(minilm_finetune, other)
    pooling = other / "1_Pooling" / "config.json"
    # sentence-transformers' newer layout, meaning what the base's flags mean: accepted
    pooling.write_text(json.dumps({"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}))
    folders.plan_merge([str(base), str(other)], "linear")
    pooling.write_text(json.dumps({"embedding_dimension": 384, "pooling_mode": "cls", "include_prompt": True}))
    with pytest.raises(UserError) as e:
        folders.plan_merge([str(base), str(other)], "linear")
    message = str(e.value)
    assert "in its embedding pipeline: 1_Pooling/config.json: " in message
    assert "pooling_mode_cls_token is true, expected false" in message
    assert "pooling_mode_mean_tokens is false, expected true" in message
    assert "..." not in message and "word_embedding_dimension" not in message  # only the keys that differ


# --- LoRA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"value": 2},
                                        "alpha_pattern": {"layer.1.attention.self.query": 3}}])
def test_merged_lora_equals_peft_merge_and_unload(tmp_path, extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from train import assets

    base_dir = assets.path("tiny-bert")
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense", "word_embeddings"],
                     init_lora_weights=False, **extra)  # random B too, so the delta is not zero
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.merge_and_unload().state_dict()

    out = folders.run_plan(folders.plan_merge([str(tmp_path / "adapter")], "lora", base=str(base_dir)), tmp_path / "m")
    got, before = weights_of(out), weights_of(Path(base_dir))
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    assert any("word_embeddings" in k for k in changed) and any("value" in k for k in changed)
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-5), k

    # an adapter trained on another base is refused
    adapter_cfg = tmp_path / "adapter" / "adapter_config.json"
    adapter_cfg.write_text(json.dumps({**json.loads(adapter_cfg.read_text()), "base_model_name_or_path": "org/other"}))
    with pytest.raises(UserError, match="its base is 'org/other'"):
        folders.plan_merge([str(tmp_path / "adapter")], "lora", base=str(base_dir))


# --- python -m train recipe=merge -------------------------------------------------------------------


def train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", "recipe=merge", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_grid_search_reports_every_candidate_and_writes_the_best(tiny_models, tmp_path):
    from train import assets
    from train.embed import encode
    from train.evaluate import StsTask, run_tasks
    from train.model import load_encoder

    sts = tmp_path / "sts.jsonl"
    lines = (assets.path("snli") / "test_sts.jsonl").read_text().splitlines()[:60]
    sts.write_text("\n".join(lines) + "\n")
    a, b = str(tiny_models["a"]), str(tiny_models["b"])
    run = tmp_path / "run"
    out = train(f"merge.models=[{a},{b}]", "merge.search=grid", "merge.grid_points=3", "eval.batch_size=64",
                "eval=snli", f"eval.tasks.snli_sts.path={sts}", "~eval.tasks.snli_ir", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run / "merge_search.json").read_text())
    rows = report["candidates"]
    assert [r["weights"] for r in rows] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert "best: #" in out.stdout and all(f"{r['score']:.4f}" in out.stdout for r in rows)
    # the grid's vertices are the inputs: their scores equal evaluating the inputs directly
    for folder, row in ((a, rows[0]), (b, rows[2])):
        enc = load_encoder(folder).eval()
        direct = run_tasks([StsTask("snli_sts", str(sts))], lambda texts, side, e=enc: encode(e, texts, side))
        assert row["metrics"] == pytest.approx(direct, abs=1e-6)
    best = max(range(3), key=lambda i: rows[i]["score"])
    assert report["best"] == best
    wa, wb, got = weights_of(Path(a)), weights_of(Path(b)), weights_of(run / "model")
    wt = rows[best]["weights"]
    assert all(torch.allclose(got[k], wt[0] * wa[k] + wt[1] * wb[k], atol=1e-6) for k in wa)
    assert not (run / ".model.search").exists()


def test_cli_gradient_search_moves_the_coefficients_and_writes_task_arithmetic(tiny_models, tmp_path):
    from train import assets

    sts = tmp_path / "sts.jsonl"
    sts.write_text("\n".join((assets.path("snli") / "test_sts.jsonl").read_text().splitlines()[:40]) + "\n")
    models = ",".join(str(tiny_models[k]) for k in ("a", "b", "c"))
    run = tmp_path / "run"
    out = train(f"merge.models=[{models}]", f"merge.base={tiny_models['base']}", "merge.method=task_arithmetic",
                "merge.search=gradient", "merge.search_steps=2", "merge.search_eval_every=1",
                "merge.search_batch_size=8", "data.limit=64", "eval=snli", f"eval.tasks.snli_sts.path={sts}",
                "~eval.tasks.snli_ir", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((run / "merge_search.json").read_text())["candidates"]
    assert len(rows) == 3 and rows[0]["weights"] == pytest.approx([1 / 3] * 3)
    assert rows[2]["weights"] != pytest.approx(rows[0]["weights"], abs=1e-4)  # Adam moved them
    best = max(rows, key=lambda r: r["score"])["weights"]
    base = weights_of(tiny_models["base"])
    ws = [weights_of(tiny_models[k]) for k in ("a", "b", "c")]
    got = weights_of(run / "model")
    for k in base:
        want = base[k] + sum(c * (w[k] - base[k]) for c, w in zip(best, ws))
        assert torch.allclose(got[k], want, atol=1e-5), k


def test_coefficient_gradient_equals_the_chain_rule_through_materialised_weights(tiny_models):
    """d loss / d c_i = <d loss / d theta, tau_i>, with the gradient wrt theta taken the plain way:
    the merged weights loaded into an ordinary encoder, forward, backward."""
    import functools

    from train import assets
    from train.data import collate, read_source
    from train.jobs.merge import coefficient_loss, task_vector_params
    from train.losses import Pairing, embedding_loss
    from train.model import load_encoder, pad

    source = read_source("snli", str(assets.path("snli") / "train_triples.jsonl"), limit=8)
    enc = load_encoder(str(tiny_models["a"])).eval()
    batch = collate([source], [(0, r) for r in range(8)], enc.tokenize)
    loss_fn = functools.partial(embedding_loss, temperature=0.05)
    base, taus = task_vector_params(enc, tiny_models["base"], [tiny_models["a"], tiny_models["b"]], "cpu")
    coef = torch.tensor([0.3, 0.9], requires_grad=True)
    coefficient_loss(enc, base, taus, coef, batch, loss_fn, mask_duplicates=True).backward()

    plain = load_encoder(str(tiny_models["a"])).eval()
    with torch.no_grad():
        for k, p in plain.named_parameters():
            p.copy_(base[k] + 0.3 * taus[0][k] + 0.9 * taus[1][k])
    q = plain(*pad(batch.query_ids, plain.pad_id))
    p = plain(*pad(batch.passage_ids, plain.pad_id))
    loss_fn(Pairing(q=q, q_all=q, p_all=p, row0=0, group=batch.group, anchor_ids=batch.anchor_hash,
                    passage_ids=batch.passage_hash)).backward()
    want = [sum((p.grad * tau[k]).sum() for k, p in plain.named_parameters() if p.grad is not None) for tau in taus]
    assert coef.grad.abs().min() > 0
    # float32 sums over every parameter: 1e-4 of the gradient's scale (an element-wise rtol fails on
    # the smaller component, whose value comes from cancellation: 2.5e-7 off at -1.4e-3 on this machine)
    assert (coef.grad - torch.stack(want)).abs().max() <= 1e-4 * coef.grad.abs().max()


@pytest.mark.parametrize("args, message", [
    (lambda t, m: ["merge.models=[/nonexistent/model_a,/nonexistent/model_b]"],
     "merge.models[0] (/nonexistent/model_a): no such model folder"),
    (lambda t, m: [f"merge.models=[{m['a']},{m['b']}]", "merge.weights=[1,2,3]"],
     "merge.weights has 3 values for 2 merge.models"),
    (lambda t, m: [f"merge.models=[{m['a']},{m['b']}]", "merge.method=ties"], "merge.method=ties needs merge.base"),
    (lambda t, m: [f"merge.models=[{m['a']},{m['b']}]", "merge.method=lora"],
     "merge.method=lora needs merge.base"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_models, tmp_path, args, message):
    out_dir = tmp_path / "merged"
    out = train(*args(tmp_path, tiny_models), f"merge.out={out_dir}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not out_dir.exists() and not list(tmp_path.glob(".merged*"))


def test_cli_refuses_to_replace_a_folder_that_is_not_a_model(tiny_models, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    out = train(f"merge.models=[{tiny_models['a']},{tiny_models['b']}]", f"merge.out={precious}",
                f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "exists and is not a model folder" in out.stderr, out.stderr[-2000:]
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
