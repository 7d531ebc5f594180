"""Every recipe composes and runs a few steps with a tiny model on the offline data, in
process, through `run()`; and the recipes' bad-input refusals name recipe, field and file."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import scored_triples

from train import assets
from train.config import CONF_DIR, recipe_files
from train.errors import UserError
from train.run import run

TINY = ["model=tiny_bert", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.chunk_size=4", "trainer.log_every=1"]
# Recipes whose job is not train/eval (mining) are tested with their job (tests/test_mine.py).
# Decoder recipes get the tiny Llama (their LoRA targets are Llama's projections).
TINY_ASSET = {"lora_llm": "tiny-llama"}
RECIPES = sorted(n for n, p in recipe_files().items() if (yaml.safe_load(p.read_text()) or {}).get("job", "train")
                 in ("train", "eval"))


def tiny_overrides(compose, name: str, tmp_path) -> list[str]:
    """The recipe on its offline data (`data=<recipe>_offline` where the default is the paper's
    Hub data) with a tiny model, a few steps, and every evaluation task cut short."""
    base = [f"recipe={name}"]
    if (CONF_DIR / "data" / f"{name}_offline.yaml").exists():
        base.append(f"data={name}_offline")
    base += [*TINY, f"model.path={assets.path(TINY_ASSET.get(name, 'tiny-bert'))}"]
    if name in ("e5_finetune", "reranker"):  # their offline data is the mining stage's output: stand in a small one
        base.append(f"data.path={scored_triples(tmp_path / 'mined.jsonl')}")
    if name == "reranker":  # the random tiny BERT's pooled [CLS] hardly varies: its scores need a larger step to move
        base.append("optim.lr=1e-3")
    cfg = compose(base)
    extra = [f"eval.tasks.{task}.limit=40" for task in cfg.eval.tasks]
    for task, spec in cfg.eval.tasks.items():  # re-ranking: the tiny model retrieves from a cut corpus
        if spec.get("kind") == "rerank":
            extra += [f"eval.tasks.{task}.retriever={assets.path('tiny-bert')}", f"eval.tasks.{task}.corpus_limit=200"]
    if cfg.loss.matryoshka_dims:  # the tiny model is 32-d
        extra += ["loss.matryoshka_dims=[32,16,8]", "eval.dims=[16,8]"]
    # One batch per source: every step trains on a batch whose loss the test measures before and after.
    if cfg.data.path:
        extra.append("data.limit=8")
    extra += [f"data.sources.{s}.limit=8" for s in cfg.data.sources]
    return [*base, *extra]


def fixed_batch_loss(cfg, model_path: str) -> float:
    """The recipe's loss on each source's whole (8-example) data as one batch, summed over the
    sources, dropout off, for the model at `model_path`."""

    from helpers import reference_grads
    from omegaconf import OmegaConf

    from train import build
    from train.data import collate

    sources = build.sources(cfg.data, cfg.loss)
    if cfg.model.kind == "cross_encoder":
        return cross_encoder_loss(cfg, sources, model_path)
    encoder = build.encoder(OmegaConf.merge(cfg, {"model": {"path": model_path, "lora": None}}).model).eval()
    loss_fn = build.loss(cfg.loss)
    return sum(reference_grads(encoder, collate(sources, [(i, r) for r in range(len(s))], encoder.tokenize),
                               loss_fn=loss_fn)[0] for i, s in enumerate(sources))


def cross_encoder_loss(cfg, sources, model_path: str) -> float:
    """fixed_batch_loss for a cross-encoder: each source's pairs scored at once, dropout off."""
    import torch
    from omegaconf import OmegaConf

    from train import build
    from train.data import collate_pairs
    from train.model import pad

    ce = build.cross_encoder(OmegaConf.merge(cfg, {"model": {"path": model_path}}).model).eval()
    loss_fn, total = build.loss(cfg.loss, "cross_encoder"), 0.0
    with torch.no_grad():
        for i, s in enumerate(sources):
            batch = collate_pairs(sources, [(i, r) for r in range(len(s))], ce.tokenize)
            total += float(loss_fn(ce(*pad(batch.pair_ids, ce.pad_id)).view(len(batch), batch.group)))
    return total


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_a_few_steps(compose, tmp_path, name):
    cfg = compose(tiny_overrides(compose, name, tmp_path))
    result = run(cfg, tmp_path)
    assert result["after"] and all(v == v for v in result["after"].values()), "no evaluation figures"
    assert (tmp_path / "config.yaml").exists()
    if cfg.eval.dims:
        assert {f"snli_sts@{d}/spearman" for d in cfg.eval.dims} <= set(result["after"])
    if cfg.job == "train":
        records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert (tmp_path / "model" / "modules.json").exists()
        before, after = fixed_batch_loss(cfg, cfg.model.path), fixed_batch_loss(cfg, str(tmp_path / "model"))
        assert after < before, f"the loss on the batches it trained on did not fall: {before} -> {after}"


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_with_evaluation_off(compose, tmp_path, name):
    """`eval=none` on any recipe and its offline data: recipes and data configs tune evaluation
    tasks (lora_llm's instructions, lora_llm_offline's cuts) that then belong to no eval config."""
    overrides = [o for o in tiny_overrides(compose, name, tmp_path) if not o.startswith("eval.tasks.")]
    cfg = compose([*overrides, "eval=none"])
    if cfg.job == "eval":  # evaluating nothing is refused with one line, not a traceback
        with pytest.raises(UserError, match="recipe=eval has no tasks"):
            run(cfg, tmp_path)
        return
    result = run(cfg, tmp_path)
    assert result["after"] == {}
    assert (tmp_path / "model" / "modules.json").exists()


def test_the_saved_model_keeps_the_base_models_inference_length(compose, tmp_path, capfd):
    """The quickstart trains MiniLM on texts cut at 32 tokens; that is a training setting, and the
    saved model keeps MiniLM's own max_seq_length unless model.save_max_length asks otherwise."""
    from sentence_transformers import SentenceTransformer

    from train.model import load_encoder

    base = json.loads((assets.path("minilm") / "sentence_bert_config.json").read_text())["max_seq_length"]
    quick = ["recipe=quickstart", "trainer.max_steps=1", "trainer.batch_size=8", "trainer.chunk_size=4",
             "data.limit=16", "eval=none"]
    cfg = compose(quick)
    assert (cfg.model.max_length, base) == (32, 256)
    run(cfg, tmp_path / "q")
    saved = tmp_path / "q" / "model"
    assert json.loads((saved / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    assert SentenceTransformer(str(saved), device="cpu").max_seq_length == 256
    assert load_encoder(str(saved)).spec.max_length == 256
    assert "texts cut at 32 tokens in training; the saved model's max_seq_length: 256" in capfd.readouterr().err
    run(compose([*quick, "model.save_max_length=64"]), tmp_path / "s")
    assert SentenceTransformer(str(tmp_path / "s" / "model"), device="cpu").max_seq_length == 64


def test_paper_recipes_default_to_the_papers_data(compose):
    """Without the offline switch a recipe is the paper's setup on the paper's data (Hub)."""
    cfg = compose(["recipe=simcse_unsup"])
    assert cfg.data.sources.wiki1m.data_files == "wiki1m_for_simcse.txt" and cfg.model.pooling == "cls"
    assert cfg.trainer.batch_size == 64 and cfg.loss.temperature == 0.05
    cfg = compose(["recipe=simcse_sup"])
    assert cfg.trainer.batch_size == 512 and cfg.optim.lr == 5e-5 and list(cfg.data.require) == ["negatives"]
    cfg = compose(["recipe=e5_pretrain"])
    assert cfg.trainer.batch_size == 32768 and cfg.loss.temperature == 0.01
    assert all(s.homogeneous for s in cfg.data.sources.values()) and cfg.model.prompts.query == "query: "
    cfg = compose(["recipe=e5_finetune", "data=e5_finetune_offline"])
    assert cfg.loss.infonce_weight == 0.2 and cfg.loss.distill_weight == 1.0 and cfg.model.path == "./runs/e5_pretrain"


@pytest.mark.parametrize("recipe, overrides, message", [
    ("simcse_sup", ["data.path={pairs}"],
     "recipe simcse_sup needs negatives (data.require), but source 'main' ({pairs})"),
    ("e5_finetune", ["data.path={triples}"], "recipe e5_finetune needs scores (loss.distill_weight=1.0), but source "
                                             "'main' ({triples})"),
    ("e5_finetune", ["data.path={scored}", "model.path=/nonexistent/e5_pretrain"],
     "recipe e5_finetune: model.path=/nonexistent/e5_pretrain: no such model folder"),
])
def test_recipes_refuse_data_they_cannot_train_on(compose, tmp_path, recipe, overrides, message):
    from hydra.core.hydra_config import HydraConfig

    files = {"pairs": str(assets.path("snli") / "train_pairs.jsonl"),
             "triples": str(assets.path("snli") / "train_triples.jsonl"),
             "scored": scored_triples(tmp_path / "scored.jsonl")}
    overrides = [o.format(**files) for o in overrides]
    cfg = compose([f"recipe={recipe}", f"data={recipe}_offline", *TINY, f"model.path={assets.path('tiny-bert')}",
                   "eval=none", "data.limit=32", *overrides])
    HydraConfig.instance().set_config(compose([f"recipe={recipe}"], hydra=True))  # the recipe name, as a run has it
    try:
        with pytest.raises(UserError, match=message.format(**files).replace("(", r"\(").replace(")", r"\)")):
            run(cfg, tmp_path)
    finally:
        HydraConfig.instance().cfg = None
    assert not (tmp_path / "model").exists()


def test_wandb_offline_needs_no_network(compose, tmp_path):
    cfg = compose([*TINY, "data.limit=64", "eval=none", "log.wandb=true", "log.wandb_mode=offline"])
    assert run(cfg, tmp_path)["after"] == {}
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_lora_llm_recipe_is_e5_mistrals_setup(compose):
    cfg = compose(["recipe=lora_llm"])
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.model.pooling == "last"
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (16, 32) and cfg.model.gradient_checkpointing
    assert cfg.optim.lr == 1e-4 and cfg.trainer.batch_size == 2048 and cfg.loss.temperature == 0.02
    assert all(s.instruction for s in cfg.data.sources.values())
    assert cfg.eval.tasks.snli_ir.instruction.startswith("Given a premise")
    offline = compose(["recipe=lora_llm", "data=lora_llm_offline"])
    assert offline.model.path.endswith("smollm2") and offline.model.lora.r == 16


def test_simcse_recipes_are_the_papers_variants(compose):
    """The values SimCSE states, written out here (not read from the YAML): Gao, Yao, Chen, arXiv
    2104.08821. Pooling ablation (sec. 6.3, Table 6): unsupervised SimCSE takes [CLS] "w/ MLP
    (train)", the MLP in training only; supervised SimCSE takes [CLS] "w/ MLP", kept at test time.
    Training details (appendix A): unsupervised batch 64, lr 3e-5, one epoch of 10^6 Wikipedia
    sentences; supervised batch 512, lr 5e-5, 3 epochs of 275,601 NLI triples; max length 32;
    temperature 0.05 (sec. 3). Weight decay: the paper states none, and its released run scripts
    leave transformers' Trainer at its default weight_decay=0.0."""
    paper = {
        "simcse_unsup": {"head": "mlp_train", "pooling": "cls", "batch": 64, "lr": 3e-5, "steps": 10**6 // 64},
        "simcse_sup": {"head": "mlp", "pooling": "cls", "batch": 512, "lr": 5e-5, "steps": round(3 * 275_601 / 512)},
    }
    for recipe, want in paper.items():
        cfg = compose([f"recipe={recipe}"])
        got = {"head": cfg.model.head, "pooling": cfg.model.pooling, "batch": cfg.trainer.batch_size,
               "lr": cfg.optim.lr, "steps": cfg.trainer.max_steps}
        assert got == want, recipe
        assert (cfg.optim.weight_decay, cfg.loss.temperature, cfg.model.max_length) == (0.0, 0.05, 32), recipe
        # the offline twin runs MiniLM (mean pooling) without a head, as its README row was measured
        offline = compose([f"recipe={recipe}", f"data={recipe}_offline"])
        assert offline.model.head is None and offline.optim.weight_decay == 0.0


def test_e5_finetune_steps_are_three_epochs_of_ms_marco(compose):
    """E5 (arXiv 2212.03533), fine-tuning: batch 256, 3 epochs; MS MARCO passage ranking has
    502,939 training queries with a relevant passage: the distinct query ids of qrels.train.tsv (532,761
    judgements, microsoft/MSMARCO-Passage-Ranking README.md), as ir_datasets' beir/msmarco/train counts
    them (huggingface.co/datasets/irds/beir_msmarco_train); queries.train.tsv has 808,731, most unjudged."""
    cfg = compose(["recipe=e5_finetune"])
    assert cfg.trainer.batch_size == 256
    assert cfg.trainer.max_steps == math.ceil(3 * 502_939 / 256)  # 5,894


@pytest.mark.parametrize("head, dense", [("mlp", True), ("mlp_train", False)])
def test_simcse_head_trains_and_is_saved_as_its_variant_says(compose, tmp_path, head, dense):
    from sentence_transformers import SentenceTransformer

    overrides = [o for o in tiny_overrides(compose, "simcse_sup", tmp_path) if not o.startswith("eval.tasks.")]
    cfg = compose([*overrides, "eval=none", "model.pooling=cls", f"model.head={head}"])
    run(cfg, tmp_path)
    saved = tmp_path / "model"
    assert (saved / "2_Dense" / "model.safetensors").exists() == dense
    assert SentenceTransformer(str(saved), device="cpu").encode(["a test"]).shape == (1, 32)
