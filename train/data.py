"""Training data: sources, records, the mixing and batching policy, the collator.

    source files / hub datasets --read_source--> Source (columns of texts)
    Mixture(sources)  --batch_at(step)-->        global batch: [(source, row)] * B
    collate(rows of this rank, encoder) -->      Batch (token ids, text hashes, teacher scores)

Record shapes, detected from the first record and then required of every record:
    (anchor, positive)                      pairs
    (anchor, positive, negatives...)        triples and wider; `negative`, `negatives` (a list)
                                            or `negative_1`, `negative_2`, ... columns
    + scores                                optional teacher scores of [positive] + negatives
    (text)                                  single texts: the positive is the text itself and
                                            dropout is the only augmentation (SimCSE)

The mixture is a pure function of (seed, step) plus per-source cursors, so every rank
draws the same global batch and takes its own slice, and a resumed run continues
exactly where it stopped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from train import sampler
from train.errors import UserError, at

ALIASES = {
    "anchor": ("anchor", "query", "question", "sentence1", "premise", "sent0", "text", "sentence"),
    "positive": ("positive", "pos", "document", "passage", "sentence2", "hypothesis", "answer", "sent1",
                 "entailment"),
    "negatives": ("negatives", "negative", "neg", "hard_negatives", "hard_negative", "sent2", "contradiction"),
    "scores": ("scores", "teacher_scores", "ce_scores"),
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


@dataclass
class Source:
    name: str
    anchors: list[str]
    positives: list[str] | None  # None: single texts, the positive is the anchor (SimCSE)
    negatives: list[list[str]]  # [N][n]
    scores: list[list[float]] | None  # [N][1+n]
    origin: str = ""
    instruction: str | None = None  # the queries' task instruction (E5-Mistral), set by the recipe

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def num_negatives(self) -> int:
        return len(self.negatives[0]) if self.negatives else 0

    def describe(self) -> str:
        shape = "single texts (positive = the text itself)" if self.positives is None else (
            f"(anchor, positive{', ' + str(self.num_negatives) + ' negatives' if self.num_negatives else ''}"
            f"{', teacher scores' if self.scores is not None else ''})")
        return f"source {self.name}: {len(self):,} {shape} from {self.origin}"


# --- reading ------------------------------------------------------------------------------------


def iter_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a bad line is an error naming file:line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{at(path, line_no)}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{at(path, line_no)}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _iter_json(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{at(path, e.lineno)}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of objects (or use .jsonl)")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
        yield i, row


def _iter_csv(path: Path, delimiter: str) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            yield reader.line_num, row


def _iter_parquet(path: Path) -> Iterable[tuple[int, dict]]:
    import pyarrow.parquet as pq

    yield from enumerate(pq.read_table(path).to_pylist(), 1)


def _iter_text(path: Path) -> Iterable[tuple[int, dict]]:
    """One text per line (SimCSE's wiki1m_for_simcse.txt); blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                yield line, {"text": text.rstrip("\n")}


def _iter_hub(name: str, subset: str | None, split: str, data_files: str | None) -> Iterable[tuple[int, dict]]:
    import datasets

    try:
        if data_files and data_files.endswith(".txt"):  # the text builder: one record per line
            ds = datasets.load_dataset("text", data_files=f"hf://datasets/{name}/{data_files}", split=split)
        else:
            ds = datasets.load_dataset(name, subset, split=split, data_files=data_files)
    except Exception as e:  # offline, unknown name, bad split: one line with the cause
        what = f"{name}/{data_files}" if data_files else name
        raise UserError(f"dataset {what!r} (split {split!r}): could not be loaded from the Hugging Face Hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    yield from enumerate(ds, 1)


def iter_rows(path: str, subset: str | None = None, split: str = "train",
              data_files: str | None = None) -> tuple[str, Iterable[tuple[int, dict]]]:
    """(origin, rows with their line or row number) of a local file or a hub dataset name."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix == ".jsonl":
            return str(p), iter_jsonl(p)
        if suffix == ".json":
            return str(p), _iter_json(p)
        if suffix in (".csv", ".tsv"):
            return str(p), _iter_csv(p, "\t" if suffix == ".tsv" else ",")
        if suffix == ".parquet":
            return str(p), _iter_parquet(p)
        if suffix == ".txt":
            return str(p), _iter_text(p)
        raise UserError(f"{p}: unknown data format {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}")
    if p.exists():
        raise UserError(f"{p}: is a folder, expected a data file ({', '.join(LOCAL_SUFFIXES)})")
    if suffix in LOCAL_SUFFIXES or path.startswith((".", "/", "~")):
        raise UserError(f"{path}: no such data file")
    return f"hub:{path}" + (f"/{data_files}" if data_files else ""), _iter_hub(path, subset, split, data_files)


def _pick(row: dict, role: str, mapping: dict[str, str]) -> str | None:
    if role in mapping:
        return mapping[role]
    return next((k for k in ALIASES[role] if k in row), None)


def _negative_columns(row: dict, mapping: dict[str, str]) -> list[str]:
    one = _pick(row, "negatives", mapping)
    if one is not None:
        return [one]
    numbered = [k for k in row if k.startswith("negative_") and k[len("negative_"):].isdigit()]
    return sorted(numbered, key=lambda k: int(k[len("negative_"):]))


def read_source(name: str, path: str, fields: dict[str, str] | None = None, num_negatives: int | None = None,
                limit: int | None = None, subset: str | None = None, split: str = "train",
                data_files: str | None = None) -> Source:
    """Read and validate every record of one source."""
    origin, rows = iter_rows(path, subset, split, data_files)
    mapping = dict(fields or {})
    anchors: list[str] = []
    positives: list[str] = []
    negatives: list[list[str]] = []
    scores: list[list[float]] = []
    cols: dict | None = None
    for line, row in rows:
        where = at(origin, line)
        if cols is None:  # the first record decides the shape
            anchor_key = _pick(row, "anchor", mapping)
            if anchor_key is None:
                raise UserError(f"{where}: no anchor text; expected a field named one of "
                                f"{', '.join(ALIASES['anchor'])} (or set fields.anchor), found {sorted(row)}")
            pos_key = _pick(row, "positive", mapping)
            neg_keys = _negative_columns(row, mapping) if pos_key else []
            cols = {"anchor": anchor_key, "positive": pos_key, "negatives": neg_keys,
                    "scores": _pick(row, "scores", mapping) if pos_key else None}
        anchors.append(_text(row, cols["anchor"], where))
        if cols["positive"]:
            positives.append(_text(row, cols["positive"], where))
            negs: list[str] = []
            for key in cols["negatives"]:
                value = row.get(key)
                if value is None:
                    raise UserError(f'{where}: missing field "{key}" (the first record has it)')
                if isinstance(value, (list, tuple)):
                    negs += [_text({key: v}, key, where) for v in value]
                else:
                    negs.append(_text(row, key, where))
            if num_negatives is not None:
                if len(negs) < num_negatives:
                    raise UserError(f"{where}: {len(negs)} negatives, but num_negatives={num_negatives}")
                negs = negs[:num_negatives]
            if negatives and len(negs) != len(negatives[0]):
                raise UserError(f"{where}: {len(negs)} negatives where the first record has {len(negatives[0])}; "
                                f"set num_negatives to use the same number from every record")
            negatives.append(negs)
            if cols["scores"]:
                s = row.get(cols["scores"])
                if not isinstance(s, (list, tuple)) or len(s) < 1 + len(negs):
                    raise UserError(f'{where}: field "{cols["scores"]}" must list one teacher score for the '
                                    f"positive and each of the {len(negs)} negatives")
                scores.append([float(x) for x in s[: 1 + len(negs)]])
        if limit is not None and len(anchors) >= limit:
            break
    if not anchors:
        raise UserError(f"{origin}: the dataset is empty")
    return Source(name, anchors, positives if cols["positive"] else None,
                  negatives if cols["positive"] else [], scores if cols["scores"] else None, origin)


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise UserError(f'{where}: missing field "{key}"')
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f'{where}: field "{key}" must be text, got {type(value).__name__}')
    if not value.strip():
        raise UserError(f'{where}: field "{key}" is empty')
    return value


# --- mixing and batching policy --------------------------------------------------------------------


@dataclass
class Mixture:
    """Deterministic, resumable stream of global batches drawn from several sources.

    Sampling probability of source i is proportional to (weight_i or size_i) ** (1 / temperature)
    (temperature 1: by size; large: towards uniform). A source marked `homogeneous` fills
    whole batches by itself (task-homogeneous batches, as in E5 and GTE pretraining, so
    in-batch negatives are not trivially easy); the others are pooled into mixed batches.
    """

    sizes: list[int]
    weights: list[float | None]
    homogeneous: list[bool]
    batch_size: int
    seed: int = 0
    temperature: float = 1.0
    names: list[str] = field(default_factory=list)
    step: int = 0
    cursors: list[list[int]] = field(default_factory=list)  # per source: [pass, position]

    def __post_init__(self) -> None:
        names = self.names or [str(i) for i in range(len(self.sizes))]
        if self.temperature <= 0:
            raise UserError(f"data.temperature={self.temperature}: expected a positive number")
        base = np.array([w if w is not None else s for w, s in zip(self.weights, self.sizes)], dtype=np.float64)
        if (base <= 0).any():
            raise UserError(f"data: source weights must be positive, got {dict(zip(names, base.tolist()))}")
        p = base ** (1.0 / self.temperature)
        self.p = p / p.sum()
        mixed = [i for i, h in enumerate(self.homogeneous) if not h]
        self.groups = [[i] for i, h in enumerate(self.homogeneous) if h] + ([mixed] if mixed else [])
        self.group_p = np.array([self.p[g].sum() for g in self.groups])
        for g in self.groups:
            total = sum(self.sizes[i] for i in g)
            if total < self.batch_size:
                label = "source " + names[g[0]] if len(g) == 1 else "mixed sources " + ", ".join(names[i] for i in g)
                raise UserError(f"trainer.batch_size={self.batch_size} is larger than the {total:,} examples of "
                                f"{label}; lower the batch size or add data")
        if not self.cursors:
            self.cursors = [[0, 0] for _ in self.sizes]

    def _take(self, src: int, k: int) -> list[int]:
        """The next k rows of source `src`: positions of its per-epoch order, computed one by one
        (train/sampler.py), so a step costs O(k) whatever the source's size."""
        rows: list[int] = []
        n = self.sizes[src]
        while len(rows) < k:
            epoch, pos = self.cursors[src]
            stop = min(n, pos + k - len(rows))
            rows += sampler.permute(np.arange(pos, stop), n, sampler.keys(self.seed, src, epoch)).tolist()
            self.cursors[src] = [epoch + 1, 0] if stop >= n else [epoch, stop]
        return rows

    def next_batch(self) -> list[tuple[int, int]]:
        """The next global batch as (source, row) pairs."""
        rng = np.random.default_rng([self.seed, self.step])
        group = self.groups[rng.choice(len(self.groups), p=self.group_p)] if len(self.groups) > 1 else self.groups[0]
        if len(group) == 1:
            picks = [group[0]] * self.batch_size
        else:
            q = self.p[group] / self.p[group].sum()
            picks = [group[j] for j in rng.choice(len(group), size=self.batch_size, p=q)]
        counts = {s: picks.count(s) for s in dict.fromkeys(picks)}
        batch = [(s, r) for s, k in counts.items() for r in self._take(s, k)]
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": [list(c) for c in self.cursors]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.cursors = int(state["step"]), [list(c) for c in state["cursors"]]


# --- collating -------------------------------------------------------------------------------------


def text_hash(text: str) -> int:
    """Stable 63-bit hash of a text, to find duplicate texts across ranks without sending strings."""
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass
class Batch:
    """One rank's share of a global batch, tokenized but not padded (chunks pad themselves)."""

    query_ids: list[list[int]]  # b sequences
    passage_ids: list[list[int]]  # b * group sequences, example-major: pos_i, neg_i_1..neg_i_n
    anchor_hash: torch.Tensor  # [b] int64
    passage_hash: torch.Tensor  # [b * group] int64
    teacher: torch.Tensor | None  # [b, group] float32
    group: int  # 1 + n

    def __len__(self) -> int:
        return len(self.query_ids)


def collate(sources: Sequence[Source], picks: Sequence[tuple[int, int]], tokenize) -> Batch:
    """picks: (source, row) of this rank's examples; tokenize(texts, side) -> token id lists."""
    groups = {1 + sources[s].num_negatives for s, _ in picks}
    if len(groups) > 1:
        names = sorted({sources[s].name for s, _ in picks})
        raise UserError(f"a mixed batch of sources {names} has examples with different numbers of negatives; "
                        "set the same num_negatives on each source or mark them homogeneous")
    group = groups.pop()
    anchors, passages, teacher = [], [], []
    for s, r in picks:
        src = sources[s]
        anchor = src.anchors[r]
        anchors.append(anchor)
        passages.append(src.positives[r] if src.positives is not None else anchor)
        passages += src.negatives[r] if src.negatives else []
        if src.scores is not None:
            teacher.append(src.scores[r])
    has_teacher = teacher and len(teacher) == len(picks)
    return Batch(
        query_ids=_tokenize_queries(tokenize, anchors, [sources[s].instruction for s, _ in picks]),
        passage_ids=tokenize(passages, "passage"),
        anchor_hash=torch.tensor([text_hash(t) for t in anchors], dtype=torch.long),
        passage_hash=torch.tensor([text_hash(t) for t in passages], dtype=torch.long),
        teacher=torch.tensor(teacher, dtype=torch.float32) if has_teacher else None,
        group=group,
    )


def _tokenize_queries(tokenize, anchors: list[str], instructions: list[str | None]) -> list[list[int]]:
    """Queries tokenized with their own source's instruction (a mixed batch may hold several)."""
    if not any(instructions):
        return tokenize(anchors, "query")
    out: list = [None] * len(anchors)
    for instruction in dict.fromkeys(instructions):
        idx = [i for i, x in enumerate(instructions) if x == instruction]
        for i, ids in zip(idx, tokenize([anchors[i] for i in idx], "query", instruction=instruction)):
            out[i] = ids
    return out


def shard(picks: Sequence[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's contiguous slice of the global batch, so gathered order = global order."""
    per = len(picks) // world
    return list(picks[rank * per : (rank + 1) * per])
