"""Streaming sources (`data.streaming=true`): corpora read as they are downloaded, or larger than the disk.

    stream_source(name, path, ..., rank, world, seed, buffer) -> StreamSource    this rank's part, shuffled
    StreamMixture.of(sources, batch_size, seed, temperature)                   which source fills each slot
    positions(sources) / seek(sources, states)                                  this rank's place, for checkpoints

The default path (data.py + arrow_store.py) indexes every record: the global batch is a function of
(seed, step), every record is seen once per epoch, resume is exact on any world size. A stream cannot be
indexed, so this mode trades that away, knowingly:
- Order: approximate. `datasets` shuffles the order of the dataset's shards and a buffer of
  `data.shuffle_buffer` records (a record can only move within the buffer's reach).
- Split by rank: whole shards per rank when the dataset has at least as many shards as ranks, otherwise
  every rank reads everything and keeps every W-th record (datasets.distributed.split_dataset_by_node).
  Which source fills each slot of the global batch is still drawn from (seed, step), the same on every
  rank; the records are each rank's next ones from its part.
- Resume: by shard and offset (`IterableDataset.state_dict`), on the same number of ranks. The records
  that sat in the shuffle buffer at the checkpoint are skipped, not repeated.
- An epoch is one pass over this rank's part; the parts of ranks may differ by up to a shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from train import arrow_store
from train.data import LOCAL_SUFFIXES, Mixture, describe_shape, read_record, record_shape
from train.errors import UserError

# datasets' builder (and its options) for each local format
BUILDERS = {".jsonl": ("json", {}), ".json": ("json", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
            ".parquet": ("parquet", {}), ".txt": ("text", {})}


class StreamSource:
    """One source read in order from this rank's part of a `datasets.IterableDataset`; the same face
    as data.Source to the mixture, collate and the start-up checks."""

    streaming = True
    positives: Any = True  # not None: (anchor, positive) records; None: single texts (SimCSE)

    def __init__(self, name: str, origin: str, stream, cols: dict, num_negatives: int | None, *,
                 weight: float | None = None, homogeneous: bool = False, instruction: str | None = None):
        self.name, self.origin, self.stream, self.cols = name, origin, stream, cols
        self.limit_negatives = num_negatives
        self.weight, self.homogeneous, self.instruction = weight, homogeneous, instruction
        # a local file is fingerprinted (size, sampled blocks) for the run record and resume's check
        self.path = Path(origin) if Path(origin).is_file() else None
        self.fingerprint = arrow_store.fingerprint(self.path) if self.path is not None else None
        if not cols["positive"]:
            self.positives = None
        self.epoch, self.read = 0, 0  # epochs begun, records read in this one
        self._rows = None

    @property
    def num_negatives(self) -> int:
        return self.cols["n"]

    @property
    def has_scores(self) -> bool:
        return bool(self.cols["scores"])

    def describe(self) -> str:
        return f"source {self.name}: streamed {describe_shape(self)} from {self.origin}"

    def take(self, rows: Sequence[int]) -> list[tuple[str, str, list[str], list[float] | None]]:
        """The next len(rows) records of this rank's part (the row numbers are placeholders: a stream
        is read in order), starting a new epoch at its end."""
        out = []
        while len(out) < len(rows):
            if self._rows is None:
                self._rows = iter(self.stream)
            row = next(self._rows, None)
            if row is None:
                if self.read == 0:
                    raise UserError(f"{self.origin}: this rank's part of the stream is empty (a dataset with "
                                    "fewer records than ranks?)")
                self.epoch, self.read, self._rows = self.epoch + 1, 0, None
                self.stream.set_epoch(self.epoch)  # another shard order and buffer shuffle
                continue
            self.read += 1
            where = f"{self.origin} (record {self.read} of epoch {self.epoch} of this rank's part)"
            anchor, positive, negatives, scores = read_record(row, self.cols, where, self.limit_negatives)
            out.append((anchor, positive if positive is not None else anchor, negatives or [], scores))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "read": self.read, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.read, self._rows = int(state["epoch"]), int(state["read"]), None
        self.stream.set_epoch(self.epoch)
        self.stream.load_state_dict(state["stream"])


def _open(path: str, subset: str | None, split: str, data_files: str | None):
    import datasets

    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{p}: is a folder, expected a data file ({', '.join(LOCAL_SUFFIXES)}) or a hub dataset")
    if p.is_file():
        if p.suffix.lower() not in BUILDERS:
            raise UserError(f"{p}: unknown data format {p.suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)}")
        if p.stat().st_size == 0:
            raise UserError(f"{p}: the dataset is empty")
        builder, options = BUILDERS[p.suffix.lower()]
        try:
            return str(p), datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True, **options)
        except Exception as e:  # noqa: BLE001 - the parser's complaint about the user's file, as one line
            raise UserError(f"{p}: could not be read as {builder}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
    if p.suffix.lower() in LOCAL_SUFFIXES or path.startswith((".", "/", "~")):
        raise UserError(f"{path}: no such data file")
    origin = f"hub:{path}" + (f"/{data_files}" if data_files else "")
    try:
        return origin, datasets.load_dataset(path, subset, split=split, data_files=data_files, streaming=True)
    except Exception as e:  # offline, unknown name, bad split: one line with the cause
        raise UserError(f"dataset {path!r} (split {split!r}): could not be streamed from the Hugging Face Hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def stream_source(name: str, path: str, *, rank: int, world: int, seed: int, buffer: int,
                  fields: dict[str, str] | None = None, num_negatives: int | None = None, limit: int | None = None,
                  subset: str | None = None, split: str = "train", data_files: str | None = None,
                  weight: float | None = None, homogeneous: bool = False, instruction: str | None = None
                  ) -> StreamSource:
    """This rank's part of a streamed dataset. The record shape (fields, negatives, scores) is read from
    the first record, which also shows an empty corpus at once."""
    from datasets.distributed import split_dataset_by_node

    if buffer < 0:
        raise UserError(f"data.shuffle_buffer={buffer}: expected 0 (stream order) or a number of records")
    origin, ds = _open(path, subset, split, data_files)
    if limit is not None:
        ds = ds.take(limit)
    try:
        first = next(iter(ds), None)
    except Exception as e:  # noqa: BLE001 - a malformed first line, as one line naming the file
        raise UserError(f"{origin}: the first record could not be read: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
    if first is None:
        raise UserError(f"{origin}: the dataset is empty")
    where = f"{origin} (first record)"
    cols = record_shape(first, dict(fields or {}), where)
    negatives = read_record(first, {**cols, "n": None}, where, num_negatives)[2]
    cols["n"] = len(negatives) if negatives is not None else 0
    if buffer > 1:  # the same seed on every rank: with one shard, ranks keep every W-th of one shuffled order
        ds = ds.shuffle(seed=seed, buffer_size=buffer)
    part = split_dataset_by_node(ds, rank=rank, world_size=world)
    return StreamSource(name, origin, part, cols, num_negatives, weight=weight, homogeneous=homogeneous,
                        instruction=instruction)


@dataclass
class StreamMixture(Mixture):
    """The sources of each global batch drawn as data.Mixture draws them, from (seed, step); the records
    are each rank's next ones from its streams. Sizes are unknown, so several sources need weights."""

    @classmethod
    def of(cls, sources: Sequence[StreamSource], batch_size: int, seed: int = 0,
           temperature: float = 1.0) -> StreamMixture:
        unweighted = [s.name for s in sources if s.weight is None]
        if len(sources) > 1 and unweighted:
            raise UserError(f"data.streaming: the size of a stream is unknown, so sources are mixed by weight; set "
                            f"data.sources.{unweighted[0]}.weight (and every source's)")
        return cls(sizes=[0] * len(sources), weights=[s.weight if s.weight is not None else 1.0 for s in sources],
                   homogeneous=[s.homogeneous for s in sources], batch_size=batch_size, seed=seed,
                   temperature=temperature, names=[s.name for s in sources])

    def _check_sizes(self, names: list[str]) -> None:
        pass  # a stream's size is unknown; an epoch ends where this rank's part does

    def _take(self, src: int, k: int) -> list[int]:
        return [0] * k  # placeholders: StreamSource.take reads the next k records of this rank's part


def positions(sources: Sequence) -> list[dict] | None:
    """Where this rank's streams stand (None: no source is streamed)."""
    if not any(s.streaming for s in sources):
        return None
    return [s.state_dict() if s.streaming else {} for s in sources]


def seek(sources: Sequence, states: list[dict]) -> None:
    for s, state in zip(sources, states):
        if s.streaming:
            s.load_state_dict(state)
