"""Arrow-backed record columns: read by index when a batch needs them, never held in Python lists.

Local files are converted once (train/data.py reads and validates them) into a cache that every
later run memory-maps; hub datasets are memory-mapped by `datasets` already and used in place.
Resident memory then holds only the pages a batch touched, not the corpus (issue 14: Python lists
cost about 0.42 KB per pair, ~110 GB per rank at E5's 270M pairs), and those only while it reads
them (Pages).

    <cache root>/<stem>-<key>/          key: blake2b of (file, its fingerprint, reading options, FORMAT)
        part-00000.arrow ...            Arrow IPC files, one per converting process, in file order
        meta.json                       written last: the file, its fingerprint, rows and size of each part
    <cache root>/<stem>-<key>.lock      held by the process that converts; the others wait on it

A changed file has another fingerprint, hence another key: its stale cache is never read (and is
removed when the new one is built). A cache folder whose parts are missing, of the wrong size or
unreadable is rebuilt with a warning. The cache root is `data.cache_dir`, else `$TRAIN_DATA_CACHE`,
else `$TRAIN_CACHE/data` (default `~/.cache/train/data`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from train.assets import train_cache
from train.atomic import atomic_folder, write_json
from train.errors import UserError
from train.log import say

FORMAT = 1  # bump when the cache layout or the reading rules change: old caches are then not read
BLOCK = 1 << 16  # bytes per sampled block of the fingerprint
FAULT_AROUND = 1 << 16  # bytes the kernel maps around a page fault on a cached file (fault_around_bytes)
SAMPLES = 16  # sampled blocks: the first, the last, and 14 spread between (1 MiB read whatever the size)


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("TRAIN_DATA_CACHE"):
        return Path(os.environ["TRAIN_DATA_CACHE"])
    return train_cache() / "data"


def fingerprint(path: Path, full: bool = False) -> dict:
    """Size, modification time and a blake2b of sampled blocks (full=True: of every byte).

    Sampling reads 1 MiB whatever the file's size, so start-up does not scale with the corpus; an
    edit that keeps the size and misses every sampled block is caught by the modification time
    where that matters (the cache key), and by `data.fingerprint=full` for the run record."""
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if full or st.st_size <= SAMPLES * BLOCK:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for offset in np.linspace(0, st.st_size - BLOCK, SAMPLES).astype(np.int64).tolist():
                f.seek(offset)
                h.update(f.read(BLOCK))
    kind = "blake2b" if full or st.st_size <= SAMPLES * BLOCK else "sampled_blake2b"
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, kind: h.hexdigest()}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`: the first process converts, the others block here until it is done."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Pages:
    """The memory maps of one cache's part files, read-only and shared (MAP_SHARED).

    Each page a read touches stays mapped into the process (RssFile) until the map is closed, and
    where the file sits in the page cache the kernel maps up to 16 cached neighbours at each fault
    (fault-around, which MADV_RANDOM does not turn off): one batch of 32,768 random rows maps ~64 KiB
    per row, the whole of each column at 10M pairs, and the process's resident memory grows with the
    corpus (issue 14). `release(array)` (madvise MADV_DONTNEED over the pages under one record
    batch's column) takes this process's page-table entries off them once its rows are read: on a
    shared file mapping that discards nothing (the page cache keeps the pages, shared by the node's
    ranks), the addresses stay valid for the Arrow arrays over them, and the next read faults a page
    back in (a minor fault while it is cached). What stays mapped is one record batch's column at a
    time, whatever the corpus's size."""

    def __init__(self) -> None:
        self.maps: list[tuple[int, mmap.mmap]] = []  # (address of the map's first byte, the map)

    def map(self, part: Path) -> pa.BufferReader:
        """`part` memory-mapped for random reads: a batch's rows are scattered, so the kernel's
        readahead (128 KiB or more per fault by default) would read, and map, mostly other rows."""
        with open(part, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the descriptor
        mm.madvise(mmap.MADV_RANDOM)
        buffer = pa.py_buffer(mm)
        self.maps.append((buffer.address, mm))
        return pa.BufferReader(buffer)

    def release(self, array: pa.Array | None = None) -> None:
        """Unmap the pages under `array`'s buffers (one chunk of a column), or under every map."""
        if array is None:
            for _, mm in self.maps:
                mm.madvise(mmap.MADV_DONTNEED)
            return
        spans = [(b.address, b.address + b.size) for b in array.buffers() if b is not None and b.size]
        if not spans:
            return
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        for base, mm in self.maps:
            if base <= lo and hi <= base + len(mm):
                # A fault maps the aligned 64 KiB window around it (the kernel's fault_around_bytes):
                # widened to those windows, the range covers what reading the chunk mapped beyond it.
                start = (lo - base) // FAULT_AROUND * FAULT_AROUND
                end = min(len(mm), -(-(hi - base) // FAULT_AROUND) * FAULT_AROUND)
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                return


def _open(folder: Path) -> tuple[pa.Table | None, Pages | None, str]:
    """(memory-mapped table, its maps, "") of a complete cache folder; (None, None, why) when it is
    absent or broken."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, None, "no meta.json" if folder.exists() else ""
    pages = Pages()
    try:
        meta = json.loads(meta_path.read_text())
        tables = []
        for name, size in meta["parts"].items():
            part = folder / name
            if part.stat().st_size != size:
                return None, None, f"{name} has {part.stat().st_size} bytes, {size} were written"
            reader = pa.ipc.open_file(pages.map(part))
            batches = []
            for i in range(reader.num_record_batches):  # zero-copy: the arrays map the file
                batches.append(reader.get_batch(i))
                if i % 256 == 255:  # each batch's header was read: ~64 KiB mapped per batch (fault-around)
                    pages.release()
            tables.append(pa.Table.from_batches(batches, reader.schema))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        return None, None, f"{type(e).__name__}: {e}"
    if table.num_rows != meta["rows"]:
        return None, None, f"{table.num_rows} rows where meta.json says {meta['rows']}"
    pages.release()  # opening read every record batch's header
    return table, pages, ""


def cached(path: Path, options: dict, build: Callable[[Path], None],
           cache_dir: str | None = None) -> tuple[pa.Table, Pages, dict]:
    """(the memory-mapped table of `path` as `build(folder)` converts it (writing part-*.arrow into
    `folder`), built once per (file content, options) by whichever process gets the lock first;
    its maps (for Column: release after each read); the file's fingerprint, which keyed it and
    which the run record and resume identity reuse)."""
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data.cache_dir: cannot create {root} for the Arrow cache of {path}: {e}") from None
    resolved = str(path.resolve())
    fp = fingerprint(path)
    key = hashlib.blake2b(json.dumps({"path": resolved, "fingerprint": fp, "options": options, "format": FORMAT},
                                     sort_keys=True).encode(), digest_size=8).hexdigest()
    folder = root / f"{path.stem}-{key}"
    with _locked(root / f"{folder.name}.lock"):
        table, pages, problem = _open(folder)
        if table is not None:
            return table, pages, fp
        if problem:
            say(f"warning: the Arrow cache {folder} of {path} is incomplete or corrupt ({problem}); rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
        with atomic_folder(folder) as tmp:  # a crash leaves a temp folder, never a folder that looks done
            build(tmp)
            parts = {p.name: p.stat().st_size for p in sorted(tmp.glob("part-*.arrow"))}
            rows = sum(_rows(tmp / p) for p in parts)
            write_json(tmp / "meta.json", {"path": resolved, "fingerprint": fp, "options": options,
                                           "format": FORMAT, "rows": rows, "parts": parts}, indent=1)
        _prune(root, resolved, fp)
        table, pages, problem = _open(folder)
        if table is None:
            raise UserError(f"the Arrow cache {folder} of {path} cannot be read right after writing it ({problem})")
        return table, pages, fp


def _rows(part: Path) -> int:
    reader = pa.ipc.open_file(pa.memory_map(str(part)))
    return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _prune(root: Path, resolved: str, fp: dict) -> None:
    """Remove the caches of earlier versions of the same file: they can never be read again."""
    for meta_path in root.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("path") == resolved and meta.get("fingerprint") != fp:
            shutil.rmtree(meta_path.parent, ignore_errors=True)


def write_part(path: Path, batches: Iterator[pa.RecordBatch]) -> int:
    """Write record batches into one Arrow IPC file (the schema of the first); returns the rows written."""
    rows, writer = 0, None
    try:
        for batch in batches:
            if writer is None:
                writer = pa.ipc.new_file(str(path), batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


# --- reading by index ------------------------------------------------------------------------------


class Rows(Sequence):
    """Equal to a list of the same values (tests and callers compare sources with lists); never hashed."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(self) != len(other):
            return False
        return list(self) == list(other)

    def __iter__(self):
        for start in range(0, len(self), 8192):  # a block at a time in memory
            yield from self.take(range(start, min(start + 8192, len(self))))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.take([i % len(self)])[0]

    def take(self, rows: Sequence[int]) -> list:
        raise NotImplementedError


class Column(Rows):
    """One field of an Arrow table as a read-only sequence; `take(rows)` fetches a batch's rows at once.

    `check` (hub datasets, which are not converted): the name of the field, so that a missing or empty
    text is refused when a batch reads it, naming the row. `pages` (a local file's cache): each
    chunk's pages released once its rows are read, so that one chunk is mapped at a time."""

    def __init__(self, array: pa.ChunkedArray, origin: str = "", check: str | None = None, width: int | None = None,
                 pages: Pages | None = None):
        self.array, self.origin, self.check, self.width, self.pages = array, origin, check, width, pages
        # Row offsets of the chunks: a take looks its rows up per chunk, as ChunkedArray.take may
        # concatenate the chunks first (a copy of the whole column).
        self.starts = np.cumsum([0] + [len(c) for c in array.chunks])

    def __len__(self) -> int:
        return len(self.array)

    def take(self, rows: Sequence[int]) -> list:
        rows = np.asarray(rows, dtype=np.int64)
        out: list = [None] * len(rows)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for c in np.unique(which).tolist():
            at = np.nonzero(which == c)[0]
            chunk = self.array.chunk(c)
            values = chunk.take(pa.array(rows[at] - self.starts[c])).to_pylist()
            if self.pages is not None:  # the values are Python copies now
                self.pages.release(chunk)
            for i, v in zip(at.tolist(), values):
                out[i] = v
        if self.check:
            for r, v in zip(rows.tolist(), out):
                _check_text(v, self.check, f"{self.origin}:{r + 1}")
        if self.width is not None:  # hub teacher scores: one per candidate, cut to the candidates used
            for i, (r, v) in enumerate(zip(rows.tolist(), out)):
                if not isinstance(v, list) or len(v) < self.width:
                    raise UserError(f'{self.origin}:{r + 1}: field "scores" must list one teacher score for the '
                                    f"positive and each of the {self.width - 1} negatives")
                out[i] = [float(x) for x in v[: self.width]]
        return out


def _check_text(value, key: str, where: str) -> None:
    if value is None:
        raise UserError(f'{where}: missing field "{key}"')
    if not isinstance(value, str):
        raise UserError(f'{where}: field "{key}" must be text, got {type(value).__name__}')
    if not value.strip():
        raise UserError(f'{where}: field "{key}" is empty')


class Negatives(Rows):
    """A record's negatives from one list column or several text columns (negative_1, negative_2, ...),
    cut to `num` (data.num_negatives); a hub row with another count is refused when read."""

    def __init__(self, columns: list[tuple[str, pa.ChunkedArray]], num: int, origin: str = "", check: bool = False,
                 pages: Pages | None = None):
        self.parts = [(key, Column(a, origin, key if check and not pa.types.is_list(a.type) else None, pages=pages),
                       pa.types.is_list(a.type) or pa.types.is_large_list(a.type)) for key, a in columns]
        self.num, self.origin, self.check = num, origin, check

    def __len__(self) -> int:
        return len(self.parts[0][1])

    def take(self, rows: Sequence[int]) -> list[list[str]]:
        out: list[list] = [[] for _ in rows]
        for _, col, is_list in self.parts:
            for negs, value in zip(out, col.take(rows)):
                negs.extend(value if is_list and value is not None else [value])
        for r, negs in zip(rows, out):
            if self.check:
                for v in negs:
                    _check_text(v, "negatives", f"{self.origin}:{r + 1}")
                if len(negs) < self.num:
                    raise UserError(f"{self.origin}:{r + 1}: {len(negs)} negatives where the first record has "
                                    f"{self.num}; set num_negatives to use the same number from every record")
            del negs[self.num:]
        return out
