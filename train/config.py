"""Typed schemas of the config tree, and their registration with Hydra.

Every group file under conf/ and every recipe is merged onto these dataclasses, so a
misspelt key (`trainer.max_stpes=5`) or a wrong type (`trainer.batch_size=abc`) fails
at compose time with the key named. Plain values only; `_target_` appears where a
torch class is built (the optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import MISSING, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"


# --- choices: a value outside these fails at compose time, naming the key and the allowed values -----


class Choice(str, Enum):
    """A string-valued choice. Members compare, hash, print and serialise as their plain value
    (`Pooling.mean == "mean"`, f"{Pooling.mean}" == "mean"), so the code reads them as strings."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def choice(name: str, *values: str) -> type[Choice]:
    """A Choice whose members are `values`, each named as its value (what OmegaConf matches)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)  # type: ignore[return-value]


Job = choice("Job", "train", "eval", "mine", "merge", "synthesize")
Pooling = choice("Pooling", "mean", "cls", "last", "latent", "echo")  # latent (NV-Embed), echo: train/llm.py
# SimCSE's MLP over the pooled embedding (arXiv 2104.08821, pooling ablation, Table 6). mlp: kept at test
# time, saved as a sentence-transformers Dense module (supervised); mlp_train: training only (unsupervised)
Head = choice("Head", "none", "mlp", "mlp_train")
Dtype = choice("Dtype", "float32", "bfloat16", "float16", "float64")
Attention = choice("Attention", "sdpa", "eager", "flash_attention_2")
Schedule = choice("Schedule", "linear", "cosine", "constant")
Precision = choice("Precision", "auto", "bf16", "fp32")
Device = choice("Device", "auto", "cpu", "cuda")
Strategy = choice("Strategy", "auto", "ddp", "fsdp2", "deepspeed")
Packing = choice("Packing", "auto", "on", "off")  # packed (padding-free) forwards: train/packing.py
Fingerprint = choice("Fingerprint", "sampled", "full")
# pairs: retrieval from a (query, positive) JSONL, each query's own positive among the cut's;
# rerank: a retrieval folder or pairs file, a bi-encoder's top k re-ranked by the cross-encoder trained
TaskKind = choice("TaskKind", "sts", "retrieval", "pairs", "rerank")
# embedder: texts -> embeddings (model.py); cross_encoder: (query, passage) -> a score (cross_encoder.py)
ModelKind = choice("ModelKind", "embedder", "cross_encoder")
# a cross-encoder's loss over each query's [positive, negatives...] scores (losses.py)
RerankLoss = choice("RerankLoss", "listwise", "pointwise")
WandbMode = choice("WandbMode", "offline", "online", "disabled")
MinedFormat = choice("MinedFormat", "jsonl", "parquet", "datasets")
MergeMethodName = choice("MergeMethodName", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                         "slerp", "lora")
MergeSearch = choice("MergeSearch", "none", "grid", "gradient")


@dataclass
class LoraConfig:
    """LoRA through peft (arXiv 2106.09685); E5-Mistral (arXiv 2401.00368): r 16, alpha 32."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    # Llama/Mistral/Qwen2 names: every attention and MLP projection; a name the model lacks is
    # refused with the model's own linear-layer names listed
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class ModelConfig:
    path: str = MISSING  # local folder or Hugging Face Hub name
    kind: ModelKind = ModelKind.embedder  # cross_encoder: a re-ranker (recipe=reranker); a bi-encoder gets a new head
    pooling: Optional[Pooling] = None  # mean | cls | last | latent | echo; None: what the model folder says, else mean
    normalize: Optional[bool] = None  # L2-normalise embeddings; None: the folder's choice, else true
    max_length: Optional[int] = None  # tokens per text; None: the folder's, else 128
    # max_seq_length of the saved model: max_length cuts texts for training only; None: the base
    # folder's own (its sentence_bert_config.json), else max_length
    save_max_length: Optional[int] = None
    # {query: "query: ", passage: "passage: "}; None: the folder's. Typed Any, checked in build.prompts:
    # OmegaConf 2.3 cannot merge a command-line dict into a None Optional[Dict] node (AttributeError)
    prompts: Any = None
    head: Optional[Head] = None  # none | mlp | mlp_train (a dense layer + tanh); None: the folder's, else none
    # weights; float64: a CPU training precision for exact comparisons (refused on CUDA, with bf16, 4-bit,
    # DeepSpeed): weights, embeddings, loss, cache and Adam in float64, model/ saved in float32
    dtype: Dtype = Dtype.float32
    attn_implementation: Optional[Attention] = None  # None: transformers' default
    truncate_dim: Optional[int] = None  # keep the first N dimensions (a Matryoshka-trained model), re-normalised
    # decoder LLMs (train/llm.py); None: what the model folder says, else the default in brackets
    bidirectional: Optional[bool] = None  # attention over the whole text, not causal (NV-Embed, LLM2Vec) [false]
    pool_prompt: Optional[bool] = None  # false: prompt/instruction tokens left out of mean pooling [true]
    instruction_template: Optional[str] = None  # query prefix with an instruction ["Instruct: {task}\nQuery: "]
    latents: Optional[int] = None  # pooling=latent (NV-Embed): latent array size [512] ...
    latent_heads: Optional[int] = None  # ... and heads [8]
    lora: Optional[LoraConfig] = None  # null: full fine-tuning
    gradient_checkpointing: bool = False  # recompute activations per layer in the backward
    quantization: Optional[str] = None  # 4bit: QLoRA's NF4 base through bitsandbytes (CUDA only, with lora)


@dataclass
class SourceConfig:
    path: str = MISSING  # local .jsonl/.json/.csv/.tsv/.parquet, or a hub dataset name
    subset: Optional[str] = None  # hub dataset configuration
    data_files: Optional[str] = None  # hub: one file inside the dataset repo (SimCSE's wiki1m_for_simcse.txt)
    split: str = "train"
    fields: Dict[str, str] = field(default_factory=dict)  # role -> column: anchor, positive, negatives, scores
    weight: Optional[float] = None  # sampling weight; None: the number of examples
    homogeneous: bool = False  # every batch drawn from this source alone
    num_negatives: Optional[int] = None  # hard negatives per example; None: as many as the data has
    limit: Optional[int] = None  # read at most this many records
    instruction: Optional[str] = None  # task instruction for this source's queries (model.instruction_template)


@dataclass
class DataConfig:
    path: Optional[str] = None  # one file or hub name; replaces `sources` when set
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    temperature: float = 1.0  # source sampling: p_i ~ size_i ** (1 / temperature)
    mask_duplicates: bool = True  # drop in-batch candidates that are copies of a positive
    limit: Optional[int] = None  # with `path`: read at most this many records
    require: List[str] = field(default_factory=list)  # fields every source must have: negatives, scores
    cache_dir: Optional[str] = None  # Arrow cache of local files; None: $TRAIN_DATA_CACHE or $TRAIN_CACHE/data
    num_proc: int = 1  # processes converting a local .jsonl/.txt file into the Arrow cache (once)
    num_workers: int = 0  # threads preparing (reading, tokenizing, collating) batches ahead of the step
    fingerprint: Fingerprint = Fingerprint.sampled  # the run record's hash of each data file (full: reads it all)
    streaming: bool = False  # read sources as streams (datasets streaming): approximate order (streaming.py)
    shuffle_buffer: int = 10_000  # with streaming: records shuffled within a buffer of this many; 0: stream order


@dataclass
class LossConfig:
    temperature: float = 0.05  # SimCSE (arXiv 2104.08821): 0.05
    symmetric: bool = False  # add the passage -> query direction
    infonce_weight: float = 1.0
    distill_weight: float = 0.0  # KL to teacher scores over each query's candidates (E5: 1.0, InfoNCE 0.2)
    teacher_temperature: float = 1.0  # softens the teacher's scores (cross-encoder logits: 1; cosines: ~0.05)
    matryoshka_dims: Optional[List[int]] = None  # also train these prefixes of the embedding, e.g. [384, 128, 64]
    matryoshka_weights: Optional[List[float]] = None  # one per dim; None: all 1
    # model.kind=cross_encoder only: listwise (softmax over positive + negatives) | pointwise (BCE per
    # pair); None: listwise for a cross-encoder, and nothing for an embedder
    rerank: Optional[RerankLoss] = None


@dataclass
class OptimConfig:
    _target_: str = "torch.optim.AdamW"
    lr: float = 2e-5
    weight_decay: float = 0.01  # not applied to biases and norm weights
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class TrainerConfig:
    max_steps: int = 100
    batch_size: int = 64  # the global contrastive batch: queries per step over all ranks
    chunk_size: Optional[int] = None  # examples per forward pass on a rank; None: the whole local batch
    # padded tokens per forward pass on a rank (texts x the chunk's longest, after length grouping):
    # memory set by a budget, not by the length distribution; None: chunks by chunk_size alone
    chunk_tokens: Optional[int] = None
    accum_steps: int = 1  # contrastive batches whose gradients are summed per optimizer step
    group_by_length: bool = True  # chunks of similar-length texts, each padded to its own longest
    # packed forwards (train/packing.py): texts end to end in rows as long as the longest text, positions
    # and attention per text, no padding computed. auto: where measured faster (see README and build.use_packing),
    # off for pooling=latent and attention kernels without a packed form; on: refuse where unsupported
    packing: Packing = Packing.auto
    schedule: Schedule = Schedule.linear  # after warmup
    warmup_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    precision: Precision = Precision.auto  # auto (bf16 autocast on a CUDA device that has it) | bf16 | fp32
    log_every: int = 10
    progress: bool = True  # a progress bar on rank 0 when stderr is a terminal
    device: Device = Device.auto
    # checkpoints (train/checkpoint.py): <run dir>/checkpoints/step-N, atomic, enough to continue exactly
    save_every: int = 0  # steps between checkpoints; 0: none (max_steps and a preemption signal still write one)
    keep_last: int = 2  # checkpoints kept; older ones are deleted after a new one is complete
    resume: Optional[str] = None  # null: fresh start | auto: latest checkpoint in this run dir | a path
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])
    preempt_exit_code: int = 143  # after a signal-triggered checkpoint (launch/slurm.sbatch requeues on it)


@dataclass
class EvalTaskConfig:
    kind: TaskKind = MISSING
    path: str = MISSING  # sts: a JSONL file; retrieval: a folder with corpus/queries/qrels.jsonl
    limit: Optional[int] = None
    side: Optional[str] = "query"  # sts: the prompt side both sentences get
    instruction: Optional[str] = None  # task instruction on the query side (sts: both sentences)
    corpus_limit: Optional[int] = None  # retrieval: the kept queries' relevant documents + others up to N
    # sts: tokens per text for this task, None: model.max_length (in training, the training cut);
    # long documents are evaluated at the model's inference length (conf/eval/ood.yaml: 256)
    max_length: Optional[int] = None
    retriever: Optional[str] = None  # rerank: the bi-encoder whose top_k documents per query are re-ranked
    top_k: int = 20  # rerank: candidates per query


@dataclass
class MtebConfig:
    """recipe=eval eval=mteb: the mteb package's tasks (train/mteb_eval.py); one of tasks or benchmark."""

    tasks: List[str] = field(default_factory=list)  # mteb task names (its mock tasks too: MockRetrievalTask)
    benchmark: Optional[str] = None  # an mteb benchmark name: "MTEB(eng, v2)", "BEIR"
    instructions: bool = False  # query-side texts get each task's instruction (model.instruction_template)


@dataclass
class PaperRow:
    """A paper's published figures for an eval config (x 100, as papers print them), keyed by mteb
    task name, "average" or "average <task type>"; tools/paper_vs_run.py prints them beside a run's."""

    source: str = MISSING  # paper and table
    scores: Dict[str, float] = field(default_factory=dict)


@dataclass
class EvalConfig:
    tasks: Dict[str, EvalTaskConfig] = field(default_factory=dict)
    mteb: Optional[MtebConfig] = None  # eval=mteb
    paper: Optional[PaperRow] = None  # the published row this evaluation reproduces
    before: bool = True  # evaluate the starting model too, for a before/after table
    every: int = 0  # also evaluate every N steps during training (sharded over the ranks); 0: before and after only
    # a metric ("snli_sts/spearman", higher is better): with `every`, model/ is the evaluated step
    # where it was highest (the last step included), not simply the last one (SimCSE: STS-B dev)
    select: Optional[str] = None
    keep_last: bool = False  # with select: also save the last step's model, as model-last/
    batch_size: int = 256
    dims: Optional[List[int]] = None  # also evaluate these embedding prefixes (Matryoshka)


@dataclass
class DistConfig:
    strategy: Strategy = Strategy.auto  # auto: ddp when launched on several processes
    zero_stage: int = 2  # deepspeed only
    deepspeed_config: Optional[str] = None  # a JSON file merged over the generated config
    # deepspeed ZeRO 1-3: one gradient reduction per optimizer step, gradients held whole on each
    # rank until then; false: a reduce-scatter after every chunk, gradients partitioned (ZeRO 2/3 memory)
    coalesce_reduction: bool = True
    # fsdp2 only: parameters stay gathered from a step's first forward to its last backward, one all-gather
    # per step instead of three per chunk (no-grad pass, replay, backward), for a whole unsharded model on
    # every rank during the step (ZeRO-2's memory for the parameters, ZeRO-3's for the optimizer state)
    fsdp_keep_gathered: bool = False


@dataclass
class LogConfig:
    wandb: bool = False
    wandb_project: str = "train"
    wandb_mode: WandbMode = WandbMode.offline


@dataclass
class MineConfig:
    """Hard-negative mining (recipe=mine_hard_negatives, train/mine.py); presets in conf/mine/."""

    corpus: Optional[str] = None  # passages to mine from (a text field, optional id); None: the data's own texts
    text_field: Optional[str] = None  # corpus text column; None: text, passage, document, contents, ...
    id_field: Optional[str] = None  # corpus id column; None: id, _id, doc_id, ... when there is one
    skip: int = 0  # rank window: skip the r best candidates (known positives not counted) ...
    window: int = 10  # ... and consider the next w, ranks r .. r+w-1
    num_negatives: int = 4  # per record; a record left with fewer is skipped (training needs the same number)
    sample: bool = False  # draw num_negatives at random (seeded) from the window instead of the best ones
    max_score: Optional[float] = None  # TopK-Abs: drop candidates scoring above this
    margin_pos: Optional[float] = None  # TopK-MarginPos: drop candidates scoring above positive - margin
    perc_pos: Optional[float] = None  # TopK-PercPos: drop candidates above perc x positive (NV-Retriever: 0.95)
    teacher: Optional[str] = None  # cross-encoder or bi-encoder: writes scores [positive, negatives...]
    teacher_batch_size: int = 32
    teacher_max_length: int = 256  # cross-encoder: tokens per (query, passage) pair
    batch_size: int = 128  # texts per encoder forward on a rank
    query_chunk: int = 1024  # exact search in blocks of query_chunk x doc_chunk scores ...
    doc_chunk: int = 16384  # ... memory O(query_chunk x (doc_chunk + k)), never the whole matrix
    faiss: bool = False  # search with faiss (exact inner product index); needs faiss-cpu or faiss-gpu
    format: MinedFormat = MinedFormat.jsonl  # datasets: a datasets.save_to_disk folder


@dataclass
class SynthConfig:
    """Synthetic queries with consistency filtering (recipe=synthesize, train/jobs/synthesize.py).
    The retriever of the filter is the bi-encoder of `model` (model.path)."""

    corpus: Optional[str] = None  # passages (a text field, optional id); required
    text_field: Optional[str] = None  # corpus text column; None: text, passage, document, contents, ...
    id_field: Optional[str] = None  # corpus id column (seeds each passage's sample); None: its line
    limit: Optional[int] = None  # the first N passages of the corpus (the filter still ranks against all)
    generator: Optional[str] = None  # an instruction-tuned causal LM folder or hub name (recipe: SmolLM2)
    prompt: str = ("Write one short search query that a user could type to find the passage below. "
                   "Reply with the query only.\n\nPassage: {passage}")  # {passage}: required; {task} with task_prompt
    # E5-Mistral / Gecko's first stage: the LLM first writes a task description for each passage from this
    # template ({passage}: required), then the query for that task (synth.prompt must then hold {task});
    # kept as the `task` field of each record. None: queries only
    task_prompt: Optional[str] = None
    queries_per_passage: int = 1  # queries per passage, each its own seeded draw (needs temperature > 0)
    max_passage_tokens: int = 256  # passages are cut to this many generator tokens before prompting
    max_new_tokens: int = 32
    max_task_tokens: int = 48  # new tokens for a task description
    temperature: float = 0.0  # 0: greedy; > 0: sampling seeded per (seed, passage id)
    batch_size: int = 8  # prompts per generate call
    # passages per output shard: the unit of resumption. Ranks whose shards are done wait for the others
    # in a collective (at most about one shard's time): keep a shard under TRAIN_DIST_TIMEOUT_S (600 s)
    shard_size: int = 64
    out: Optional[str] = None  # output folder; None: the run dir. Rerun with the same out to resume
    top_k: int = 3  # keep a pair when its passage ranks within the top k for its query
    relabel: bool = False  # positive := the top-ranked passage (Gecko) instead of the source passage
    num_negatives: int = 0  # hard negatives from the same ranking, at ranks top_k and below
    batch_size_filter: int = 128  # texts per retriever forward on a rank


@dataclass
class MergeConfig:
    """Model merging (recipe=merge, train/merge.py; the weight search in train/merge_search.py)."""

    models: List[str] = field(default_factory=list)  # model folders (run dirs work); method=lora: adapter folders
    method: MergeMethodName = MergeMethodName.linear
    weights: Optional[List[float]] = None  # one per model; None: 1/n (lora: 1). slerp: t = w[1] / (w[0] + w[1])
    base: Optional[str] = None  # task_arithmetic, ties, dare_*: the models' common starting point; lora: the base
    scale: float = 1.0  # lambda: multiplies the merged task vector
    density: float = 0.2  # ties: fraction of each task vector kept (largest magnitudes, per tensor)
    drop_rate: float = 0.9  # dare_*: probability of dropping a task-vector entry
    spec_from: Optional[int] = None  # take pooling/normalisation/prompts from models[i]; None: all must agree
    check_adapter_base: bool = True  # lora: refuse an adapter whose base_model_name_or_path is not merge.base
    out: Optional[str] = None  # output folder; None: <run dir>/model
    shard_mb: int = 4096  # output shards of at most this many MiB
    search: MergeSearch = MergeSearch.none  # grid: 2-3 models; gradient: task-vector coefficients (Self Positioning)
    grid_points: int = 5  # grid: points per edge of the weight simplex (5: 0, .25, .5, .75, 1)
    objective: Dict[str, float] = field(default_factory=dict)  # metric -> weight; {}: each task's main metric
    search_steps: int = 30  # gradient: optimizer steps on the coefficients
    search_lr: float = 0.05
    search_batch_size: int = 32
    search_eval_every: int = 10  # gradient: also evaluate the coefficients every N steps


@dataclass
class Config:
    job: Job = Job.train
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


class RunDirCheck(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): a run or sweep dir that cannot be written is
    one `error:` line and exit 2 before anything starts, instead of Hydra's traceback from its mkdir."""

    def _check(self, folder: str) -> None:
        import sys
        import tempfile

        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as e:
            print(f"error: run dir {folder} is not writable: {e.strerror or e}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_run_start(self, config, **kwargs) -> None:
        self._check(str(config.hydra.run.dir))

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(str(config.hydra.sweep.dir))


def recipe_files() -> dict[str, Path]:
    """recipes/*.yaml, plus any folder named in TRAIN_RECIPE_PATH (colon-separated)."""
    import os

    dirs = [RECIPES_DIR] + [Path(p) for p in os.environ.get("TRAIN_RECIPE_PATH", "").split(":") if p]
    found: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def register() -> None:
    """Register the schema, the recipes (as the `recipe` group) and the `asset` resolver."""
    from hydra.core.config_store import ConfigStore

    from train import assets

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, path in recipe_files().items():
        # recipes/ would otherwise be the group `recipes`; registering each file under
        # `recipe` with package _global_ lets `recipe=NAME` override any block.
        cs.store(group="recipe", name=name, node=OmegaConf.load(path), package="_global_")
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(assets.path(name)), use_cache=True)


def recipe_name() -> str:
    """The recipe this run was composed from (for error messages); "-" outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("recipe") or "-"
    except ValueError:  # HydraConfig not set: called from Python, not from `python -m train`
        return "-"
