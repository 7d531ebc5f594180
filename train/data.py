"""Training data: sources, records, the mixing and batching policy, the collator.

    source files / hub datasets --read_source--> Source (Arrow-backed columns, weight, instruction)
    Mixture.of(sources) --next_batch()-->        global batch: [(source, row)] * B
    shard(batch, rank) --collate(tokenize)-->    Batch (token ids, text hashes, teacher scores)

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
import functools
import json
from dataclasses import dataclass, field, replace
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pyarrow as pa

from train import arrow_store, sampler
from train.boundary import utf8_message
from train.errors import UserError, at

if TYPE_CHECKING:
    import torch

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
    """One source's records as columns: Python lists (built in tests) or Arrow-backed sequences
    (train/arrow_store.py) that read a row when a batch asks for it."""

    name: str
    anchors: Sequence[str]
    positives: Sequence[str] | None  # None: single texts, the positive is the anchor (SimCSE)
    negatives: Sequence[list[str]]  # [N][n]; empty when the records have none
    scores: Sequence[list[float]] | None  # [N][1+n]
    origin: str = ""
    weight: float | None = None  # sampling weight; None: the number of records
    homogeneous: bool = False  # every batch drawn from this source alone
    instruction: str | None = None  # the queries' task instruction (E5-Mistral)
    path: Path | None = None  # the local file it was read from (None: a hub dataset or built in memory)
    fingerprint: dict | None = None  # a local file's (arrow_store.fingerprint) or a hub dataset's, as read

    streaming = False  # an indexable source; train/streaming.py's StreamSource reads as it goes

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def has_scores(self) -> bool:
        return self.scores is not None

    @property
    def num_negatives(self) -> int:
        return len(self.negatives[0]) if len(self.negatives) else 0

    def describe(self) -> str:
        return f"source {self.name}: {len(self):,} {describe_shape(self)} from {self.origin}"

    def take(self, rows: Sequence[int]) -> list[tuple[str, str, list[str], list[float] | None]]:
        """(anchor, positive, negatives, scores) of each row, fetched together (one Arrow take per field)."""
        anchors = _take(self.anchors, rows)
        positives = _take(self.positives, rows) if self.positives is not None else anchors
        negatives = _take(self.negatives, rows) if len(self.negatives) else [[] for _ in rows]
        scores = _take(self.scores, rows) if self.scores is not None else [None] * len(rows)
        return list(zip(anchors, positives, negatives, scores))


def describe_shape(source) -> str:
    """What one record of a source (indexed or streamed) holds."""
    if source.positives is None:
        return "single texts (positive = the text itself)"
    n = source.num_negatives
    return f"(anchor, positive{f', {n} negatives' if n else ''}{', teacher scores' if source.has_scores else ''})"


def _take(column: Sequence, rows: Sequence[int]) -> list:
    return column.take(rows) if isinstance(column, arrow_store.Rows) else \
        [column[r] for r in rows]


# --- reading ------------------------------------------------------------------------------------


def iter_jsonl(path: Path, start: int = 0, end: int | None = None, first_line: int = 1
               ) -> Iterable[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a bad line is an error naming file:line.
    start/end: a byte range that begins at a line start (a converting worker's share), first_line its number."""
    for line_no, line in _lines(path, start, end, first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{at(path, line_no)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{at(path, line_no)}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row


def _lines(path: Path, start: int = 0, end: int | None = None, first_line: int = 1) -> Iterable[tuple[int, str]]:
    """(line number, text without its line break) of the lines that begin in [start, end)."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, line_no = start, first_line
        for raw in f:
            if end is not None and pos >= end:
                break
            pos += len(raw)
            try:
                yield line_no, raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as e:
                raise UserError(utf8_message(path, line_no, raw, e)) from None
            line_no += 1


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

    rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=8192) for row in batch.to_pylist())
    yield from enumerate(rows, 1)  # a batch at a time in memory, not the whole file


def _iter_text(path: Path, start: int = 0, end: int | None = None, first_line: int = 1
               ) -> Iterable[tuple[int, dict]]:
    """One text per line (SimCSE's wiki1m_for_simcse.txt); blank lines are skipped."""
    for line, text in _lines(path, start, end, first_line):
        if text.strip():
            yield line, {"text": text}


def _load_hub(name: str, subset: str | None, split: str, data_files: str | None):
    """The `datasets.Dataset`: Arrow files in the datasets cache, memory-mapped, not copied."""
    import datasets

    try:
        if data_files and data_files.endswith(".txt"):  # the text builder: one record per line
            return datasets.load_dataset("text", data_files=f"hf://datasets/{name}/{data_files}", split=split)
        return datasets.load_dataset(name, subset, split=split, data_files=data_files)
    except Exception as e:  # offline, unknown name, bad split: one line with the cause
        what = f"{name}/{data_files}" if data_files else name
        raise UserError(f"dataset {what!r} (split {split!r}): could not be loaded from the Hugging Face Hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def _iter_hub(name: str, subset: str | None, split: str, data_files: str | None) -> Iterable[tuple[int, dict]]:
    yield from enumerate(_load_hub(name, subset, split, data_files), 1)


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
                data_files: str | None = None, cache_dir: str | None = None, num_proc: int = 1, *,
                weight: float | None = None, homogeneous: bool = False, instruction: str | None = None) -> Source:
    """One source, Arrow-backed: a local file is read and every record validated once, into the Arrow
    cache that later runs memory-map (train/arrow_store.py); a hub dataset is used in place.
    weight, homogeneous, instruction: how it is mixed and prompted (they travel with the records)."""
    how = {"weight": weight, "homogeneous": homogeneous, "instruction": instruction}
    mapping = dict(fields or {})
    origin, _ = iter_rows(path, subset, split, data_files)  # refuses a missing file or an unknown format
    p = Path(path).expanduser()
    if not p.is_file():
        return replace(_hub_source(name, origin, _load_hub(path, subset, split, data_files), mapping, num_negatives,
                                   limit), **how)
    options = {"fields": mapping, "num_negatives": num_negatives, "limit": limit}
    table, fp = arrow_store.cached(
        p, options, functools.partial(_convert, p, mapping, num_negatives, limit, num_proc), cache_dir)
    names = table.column_names

    def column(key: str) -> arrow_store.Column | None:
        return arrow_store.Column(table.column(key)) if key in names else None

    n = len(table.column("negatives")[0]) if "negatives" in names else 0
    negatives = arrow_store.Negatives([("negatives", table.column("negatives"))], n) \
        if "negatives" in names else []
    return Source(name, column("anchor"), column("positive"), negatives, column("scores"), origin, path=p,
                  fingerprint=fp, **how)


# --- converting a local file into Arrow (once; train/arrow_store.py keeps the result) ----------------

BATCH_ROWS = 8192  # records per Arrow record batch while converting: what conversion holds in memory
PARALLEL = (".jsonl", ".txt")  # formats split by byte ranges over num_proc processes (a line is a record)


def record_shape(row: dict, mapping: dict[str, str], where: str) -> dict:
    """The columns of each role, decided by the first record (or a hub dataset's column names)."""
    anchor_key = _pick(row, "anchor", mapping)
    if anchor_key is None:
        raise UserError(f"{where}: no anchor text; expected a field named one of "
                        f"{', '.join(ALIASES['anchor'])} (or set fields.anchor), found {sorted(row)}")
    pos_key = _pick(row, "positive", mapping)
    return {"anchor": anchor_key, "positive": pos_key, "negatives": _negative_columns(row, mapping) if pos_key else [],
            "scores": _pick(row, "scores", mapping) if pos_key else None, "n": None}


def read_record(row: dict, cols: dict, where: str, num_negatives: int | None) -> tuple:
    """(anchor, positive, negatives, scores) of one row, validated; cols["n"] is the first record's count."""
    anchor = _text(row, cols["anchor"], where)
    if not cols["positive"]:
        return anchor, None, None, None
    positive = _text(row, cols["positive"], where)
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
    if cols["n"] is not None and len(negs) != cols["n"]:
        raise UserError(f"{where}: {len(negs)} negatives where the first record has {cols['n']}; "
                        f"set num_negatives to use the same number from every record")
    scores = None
    if cols["scores"]:
        s = row.get(cols["scores"])
        if not isinstance(s, (list, tuple)) or len(s) < 1 + len(negs):
            raise UserError(f'{where}: field "{cols["scores"]}" must list one teacher score for the '
                            f"positive and each of the {len(negs)} negatives")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in s[: 1 + len(negs)]):
            raise UserError(f'{where}: field "{cols["scores"]}" must hold numbers, got {s[: 1 + len(negs)]}')
        scores = [float(x) for x in s[: 1 + len(negs)]]
    return anchor, positive, negs, scores


def _schema(cols: dict) -> pa.Schema:
    fields = [("anchor", pa.string())]
    if cols["positive"]:
        fields.append(("positive", pa.string()))
        if cols["negatives"]:
            fields.append(("negatives", pa.list_(pa.string())))
        if cols["scores"]:
            fields.append(("scores", pa.list_(pa.float64())))
    return pa.schema(fields)


def _batches(origin: str, rows: Iterable[tuple[int, dict]], mapping: dict[str, str], num_negatives: int | None,
             limit: int | None, cols: dict | None = None) -> Iterable[pa.RecordBatch]:
    """Validated records as Arrow record batches of BATCH_ROWS; cols: the shape (None: from the first record)."""
    buf: list[tuple] = []
    count = 0
    for line, row in rows:
        where = at(origin, line)
        if cols is None:
            cols = record_shape(row, mapping, where)
        record = read_record(row, cols, where, num_negatives)
        if cols["n"] is None:
            cols["n"] = len(record[2]) if record[2] is not None else 0
        buf.append(record)
        count += 1
        if len(buf) >= BATCH_ROWS:
            yield _record_batch(buf, cols)
            buf = []
        if limit is not None and count >= limit:
            break
    if buf:
        yield _record_batch(buf, cols)


def _record_batch(records: list[tuple], cols: dict) -> pa.RecordBatch:
    schema = _schema(cols)
    columns = dict(zip(("anchor", "positive", "negatives", "scores"), zip(*records)))
    return pa.record_batch([list(columns[k]) for k in schema.names], schema=schema)


def _convert(path: Path, mapping: dict[str, str], num_negatives: int | None, limit: int | None, num_proc: int,
             folder: Path) -> None:
    """Read and validate every record of a local file into folder/part-*.arrow."""
    if num_proc > 1 and limit is None and path.suffix.lower() in PARALLEL:
        return _convert_parallel(path, mapping, num_negatives, num_proc, folder)
    origin, rows = iter_rows(str(path))
    if not arrow_store.write_part(folder / "part-00000.arrow", _batches(origin, rows, mapping, num_negatives, limit)):
        raise UserError(f"{origin}: the dataset is empty")


def _reader(path: Path):
    return iter_jsonl if path.suffix.lower() == ".jsonl" else _iter_text


def _convert_parallel(path: Path, mapping: dict[str, str], num_negatives: int | None, num_proc: int,
                      folder: Path) -> None:
    """num_proc processes, each converting the lines that begin in its byte range into its own part.
    The first record fixes the shape for all; a first pass counts lines so errors name the file's line."""
    import multiprocessing

    first = next(iter(_reader(path)(path)), None)
    if first is None:
        raise UserError(f"{path}: the dataset is empty")
    cols = record_shape(first[1], mapping, at(path, first[0]))
    negs = read_record(first[1], cols, at(path, first[0]), num_negatives)[2]
    cols["n"] = len(negs) if negs is not None else 0
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        for i in range(1, num_proc):
            f.seek(max(size * i // num_proc, bounds[-1]))
            f.readline()  # to the start of the next line
            bounds.append(min(f.tell(), size))
    bounds.append(size)
    ranges = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    # spawn, not fork: the parent may hold threads (tokenizers, a process group) that fork would copy half-way
    with multiprocessing.get_context("spawn").Pool(len(ranges)) as pool:
        counts = pool.starmap(_count_lines, [(path, a, b) for a, b in ranges])
        firsts = np.cumsum([1] + counts[:-1]).tolist()
        results = pool.starmap(_convert_range, [(path, a, b, line, folder / f"part-{i:05d}.arrow", mapping,
                                                 num_negatives, cols)
                                                for i, ((a, b), line) in enumerate(zip(ranges, firsts))])
    errors = [message for ok, message in results if not ok]
    if errors:  # the first in file order
        raise UserError(errors[0])


def _count_lines(path: Path, start: int, end: int) -> int:
    with open(path, "rb") as f:
        f.seek(start)
        count, left = 0, end - start
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            count, left = count + block.count(b"\n"), left - len(block)
    return count


def _convert_range(path: Path, start: int, end: int, first_line: int, part: Path, mapping: dict[str, str],
                   num_negatives: int | None, cols: dict) -> tuple[bool, str]:
    """A worker's share: (True, rows) or (False, the error line), so the parent reports the first in file order."""
    try:
        rows = _reader(path)(path, start, end, first_line)
        written = arrow_store.write_part(part, _batches(str(path), rows, mapping, num_negatives, None, dict(cols)))
        return True, str(written)
    except UserError as e:
        return False, str(e)


# --- hub datasets, in place ------------------------------------------------------------------------


def _hub_source(name: str, origin: str, ds, mapping: dict[str, str], num_negatives: int | None,
                limit: int | None) -> Source:
    """A hub dataset's memory-mapped table used as it is: columns chosen by name (the same aliases),
    types checked now; a missing or empty text or a short list of negatives is refused when a batch
    reads it (checking every row here would be a pass over the whole corpus at every start)."""
    if ds._indices is not None:  # a selection or shuffle of the rows: write it out once
        ds = ds.flatten_indices()
    table = ds.data.table
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0:
        raise UserError(f"{origin}: the dataset is empty")
    where = at(origin, 1)
    cols = record_shape({c: None for c in table.column_names}, mapping, where)
    keys = [cols["anchor"], cols["positive"], *cols["negatives"], cols["scores"]]
    for key in filter(None, keys):
        if key not in table.column_names:
            raise UserError(f'{where}: missing field "{key}"; the dataset has {", ".join(table.column_names)}')
    for key in filter(None, [cols["anchor"], cols["positive"]]):
        kind = table.schema.field(key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f'{where}: field "{key}" must be text, got {kind}')

    def column(key: str, check: bool = True) -> arrow_store.Column:
        return arrow_store.Column(table.column(key), origin, key if check else None)

    negatives: Sequence = []
    n = 0
    if cols["negatives"]:
        parts = [(k, table.column(k)) for k in cols["negatives"]]
        n = len(arrow_store.Negatives(parts, 1 << 30).take([0])[0])
        if num_negatives is not None:
            if n < num_negatives:
                raise UserError(f"{where}: {n} negatives, but num_negatives={num_negatives}")
            n = num_negatives
        negatives = arrow_store.Negatives(parts, n, origin, check=True)
    scores = None
    if cols["scores"]:
        scores = arrow_store.Column(table.column(cols["scores"]), origin, width=1 + n)
    return Source(name, column(cols["anchor"]), column(cols["positive"]) if cols["positive"] else None, negatives,
                  scores, origin, fingerprint={"datasets_fingerprint": ds._fingerprint})


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


def check_shapes(sources: Sequence[Source]) -> None:
    """Sources pooled into mixed batches must have the same number of negatives: a batch is one
    [B, 1 + n] layout. Checked on every rank at start-up, before any collective, naming the sources
    (homogeneous sources fill whole batches, so each may have its own)."""
    mixed = [s for s in sources if not s.homogeneous]
    counts = {s.name: s.num_negatives for s in mixed}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r} has {n}" for name, n in counts.items())
        raise UserError(f"data.sources: sources mixed into one batch differ in their number of negatives ({listed}); "
                        "set the same num_negatives on each source, or mark them homogeneous")


# Sources up to this many records keep numpy's exact permutation per epoch, held as int64 (16 MiB at
# the limit): O(n) once per epoch, then O(k) per step. Larger ones use the keyed bijection (sampler.py).
EXACT_ORDER_MAX = 2**21


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
    _orders: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # small sources' orders

    @classmethod
    def of(cls, sources: Sequence[Source], batch_size: int, seed: int = 0, temperature: float = 1.0) -> Mixture:
        return cls(sizes=[len(s) for s in sources], weights=[s.weight for s in sources],
                   homogeneous=[s.homogeneous for s in sources], batch_size=batch_size, seed=seed,
                   temperature=temperature, names=[s.name for s in sources])

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
        self._check_sizes(names)
        if not self.cursors:
            self.cursors = [[0, 0] for _ in self.sizes]

    def _check_sizes(self, names: list[str]) -> None:
        for g in self.groups:
            total = sum(self.sizes[i] for i in g)
            if total < self.batch_size:
                label = "source " + names[g[0]] if len(g) == 1 else "mixed sources " + ", ".join(names[i] for i in g)
                raise UserError(f"trainer.batch_size={self.batch_size} is larger than the {total:,} examples of "
                                f"{label}; lower the batch size or add data")

    def _take(self, src: int, k: int) -> list[int]:
        """The next k rows of source `src`, in its order for the current epoch."""
        rows: list[int] = []
        n = self.sizes[src]
        while len(rows) < k:
            epoch, pos = self.cursors[src]
            stop = min(n, pos + k - len(rows))
            rows += self._rows(src, epoch, pos, stop).tolist()
            self.cursors[src] = [epoch + 1, 0] if stop >= n else [epoch, stop]
        return rows

    def _rows(self, src: int, epoch: int, start: int, stop: int) -> np.ndarray:
        """Positions start..stop-1 of source `src`'s order in `epoch`. Up to EXACT_ORDER_MAX records:
        numpy's permutation, made once per epoch and kept (every order, and so every figure, measured
        before the keyed permutation existed stays as it was). Beyond: the keyed Feistel bijection of
        train/sampler.py, computed only at these positions, O(k) whatever the source's size."""
        n = self.sizes[src]
        if n > EXACT_ORDER_MAX:
            return sampler.permute(np.arange(start, stop), n, sampler.keys(self.seed, src, epoch))
        kept = self._orders.get(src)
        if kept is None or kept[0] != epoch:
            kept = self._orders[src] = (epoch, np.random.default_rng([self.seed, 7919, src, epoch]).permutation(n))
        return kept[1][start:stop]

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


def fetch(sources: Sequence[Source], picks: Sequence[tuple[int, int]]) -> list[tuple]:
    """(anchor, positive, negatives, scores) of each pick, in order; one read per source and field."""
    rows: dict[int, list[int]] = {}
    for s, r in picks:
        rows.setdefault(s, []).append(r)
    fetched = {s: iter(sources[s].take(r)) for s, r in rows.items()}
    return [next(fetched[s]) for s, _ in picks]


def _texts(sources: Sequence[Source], picks: Sequence[tuple[int, int]], records: Sequence[tuple] | None
           ) -> tuple[list[str], list[str], list[list[float]] | None, int]:
    """(anchors [b], passages [b*group] example-major, teacher scores [b][group] or None, group);
    records: the picks already fetched (a stream is read in order, before tokenizing in a thread)."""
    groups = {1 + sources[s].num_negatives for s, _ in picks}
    if len(groups) > 1:
        names = sorted({sources[s].name for s, _ in picks})
        raise UserError(f"a mixed batch of sources {names} has examples with different numbers of negatives; "
                        "set the same num_negatives on each source or mark them homogeneous")
    group = groups.pop()
    anchors, passages, teacher = [], [], []
    for anchor, positive, negatives, scores in records if records is not None else fetch(sources, picks):
        anchors.append(anchor)
        passages += [positive, *negatives]
        if scores is not None:
            teacher.append(scores)
    return anchors, passages, teacher if teacher and len(teacher) == len(picks) else None, group


def collate(sources: Sequence[Source], picks: Sequence[tuple[int, int]], tokenize,
            records: Sequence[tuple] | None = None) -> Batch:
    """picks: (source, row) of this rank's examples; tokenize(texts, side) -> token id lists."""
    import torch  # here, not at import: converting workers import this module and need no torch

    anchors, passages, teacher, group = _texts(sources, picks, records)
    return Batch(
        query_ids=_tokenize_queries(tokenize, anchors, [sources[s].instruction for s, _ in picks]),
        passage_ids=tokenize(passages, "passage"),
        anchor_hash=torch.tensor([text_hash(t) for t in anchors], dtype=torch.long),
        passage_hash=torch.tensor([text_hash(t) for t in passages], dtype=torch.long),
        teacher=torch.tensor(teacher, dtype=torch.float32) if teacher else None,
        group=group,
    )


@dataclass
class PairBatch:
    """One rank's share of a global batch for a cross-encoder: each query paired with its own
    positive and negatives, tokenized together, unpadded."""

    pair_ids: list[list[int]]  # b * group sequences, example-major: (q_i, pos_i), (q_i, neg_i_1), ...
    group: int  # 1 + n

    def __len__(self) -> int:
        return len(self.pair_ids) // self.group


def collate_pairs(sources: Sequence[Source], picks: Sequence[tuple[int, int]], tokenize,
                  records: Sequence[tuple] | None = None) -> PairBatch:
    """picks: (source, row) of this rank's examples; tokenize([(query, passage), ...]) -> token id lists."""
    anchors, passages, _, group = _texts(sources, picks, records)
    return PairBatch(tokenize([(anchors[i // group], p) for i, p in enumerate(passages)]), group)


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
