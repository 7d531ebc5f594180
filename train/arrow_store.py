"""Arrow-backed record columns: read by index when a batch needs them, never held in Python lists.

Local files are converted once (train/data.py reads and validates them) into a cache that every
later run memory-maps; hub datasets are memory-mapped by `datasets` already and used in place.
Resident memory then holds only the pages a batch touched, not the corpus (issue 14: Python lists
cost about 0.42 KB per pair, ~110 GB per rank at E5's 270M pairs), and those only while it reads
them: Column.take asks the kernel for all of a batch's pages at once (_willneed: a corpus the page
cache does not hold is then read from disk side by side, not one fault after another), reads the
rows in address order, chunk by chunk, and unmaps the pages behind it (_Sweep), wherever the column
lies in a read-only file mapping (the cache's parts and `datasets`' Arrow files alike; never memory
of an in-memory table). The rows of a chunk with few of the batch's rows are read straight from the
mapping, all the batch's offsets first, then the bytes they locate (_Direct); a chunk with many
through Arrow.

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

import bisect
import ctypes
import fcntl
import functools
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
    """The memory maps of one cache's part files, read-only and shared (MAP_SHARED), for random reads.

    Opening a cache reads every record batch's header: `release()` then unmaps what that mapped
    (madvise MADV_DONTNEED: on a shared file mapping it discards nothing, the page cache keeps the
    pages). The rows themselves are read, and their pages released, by Column."""

    def __init__(self) -> None:
        self.maps: list[mmap.mmap] = []

    def map(self, part: Path) -> pa.BufferReader:
        """`part` memory-mapped for random reads: a batch's rows are scattered, so the kernel's
        readahead (128 KiB or more per fault by default) would read, and map, mostly other rows."""
        with open(part, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the mapping outlives the descriptor
        mm.madvise(mmap.MADV_RANDOM)
        self.maps.append(mm)
        return pa.BufferReader(pa.py_buffer(mm))  # the table's arrays keep the map alive

    def release(self) -> None:
        for mm in self.maps:
            mm.madvise(mmap.MADV_DONTNEED)


def _open(folder: Path) -> tuple[pa.Table | None, str]:
    """(memory-mapped table, "") of a complete cache folder; (None, why) when it is absent or broken."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, "no meta.json" if folder.exists() else ""
    pages = Pages()
    try:
        meta = json.loads(meta_path.read_text())
        tables = []
        for name, size in meta["parts"].items():
            part = folder / name
            if part.stat().st_size != size:
                return None, f"{name} has {part.stat().st_size} bytes, {size} were written"
            reader = pa.ipc.open_file(pages.map(part))
            batches = []
            for i in range(reader.num_record_batches):  # zero-copy: the arrays map the file
                batches.append(reader.get_batch(i))
                if i % 256 == 255:  # each batch's header was read: ~64 KiB mapped per batch (fault-around)
                    pages.release()
            tables.append(pa.Table.from_batches(batches, reader.schema))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        return None, f"{type(e).__name__}: {e}"
    if table.num_rows != meta["rows"]:
        return None, f"{table.num_rows} rows where meta.json says {meta['rows']}"
    pages.release()  # opening read every record batch's header
    return table, ""


def cached(path: Path, options: dict, build: Callable[[Path], None],
           cache_dir: str | None = None) -> tuple[pa.Table, dict]:
    """(the memory-mapped table of `path` as `build(folder)` converts it (writing part-*.arrow into
    `folder`), built once per (file content, options) by whichever process gets the lock first;
    the file's fingerprint, which keyed it and which the run record and resume identity reuse)."""
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
        table, problem = _open(folder)
        if table is not None:
            return table, fp
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
        table, problem = _open(folder)
        if table is None:
            raise UserError(f"the Arrow cache {folder} of {path} cannot be read right after writing it ({problem})")
        return table, fp


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


# A fault maps pages around the one it needs (fault-around, and whole large folios of the page cache:
# up to 1 MiB measured on this machine's kernel, 6.18), but never beyond the page table that holds
# it: 512 entries of 8 bytes, 2 MiB with 4 KiB pages. Released in windows of that span, a range
# leaves nothing its reads mapped behind.
PTE_SPAN = mmap.PAGESIZE * (mmap.PAGESIZE // 8)
# Rows of one chunk from which a take reads them through Arrow (chunk.take + to_pylist: ~40 us per
# call, then ~0.7 us a row less) rather than row by row from the mapping: the two cost the same at
# ~54 rows (measured, 10M pairs: 13 rows per chunk 0.19 against 0.29 s per batch; 215 rows 1.6
# against 1.2 s). 1M pairs draw ~270 rows of a chunk per batch of 32,768, 10M ~27, 50M ~5.
ARROW_ROWS = 64


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's read-only, file-backed memory mappings (/proc/self/maps):
    the only memory whose pages may be released. MADV_DONTNEED on anonymous memory (an in-memory
    table) would zero it; on a file mapping never written, the next read maps the file's page again.
    [] on a system without /proc: nothing is then released."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:  # "start-end perms offset dev inode path"
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[1].startswith("r-") and fields[4] != "0" and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            spans.append((int(start, 16), int(end, 16), fields[5]))
    return sorted(spans)


_madvise: Callable | None = None  # libc's; False once MADV_DONTNEED has failed (nothing is released after that)
_libc = functools.cache(lambda: ctypes.CDLL(None, use_errno=True))  # a CDLL call releases the GIL: a prefetch
# thread's reads and madvise calls overlap the step
# Pages closer than this are asked for in one call: a call costs ~3 us through ctypes (measured on
# cached pages, 2026-12-02), and the disk reads up to 16 KiB more in the same request.
WILLNEED_GAP = 4
# Pages of a take's step looked up in the page cache (mincore) before any is asked for: all there, and
# none is. Where the corpus is in the page cache the calls only cost: the read of a batch of 32,768
# pairs at 50M pairs took 1.11-1.26 s without the look-up, 0.85-1.04 s with it (2026-12-02, 2 cores).
WILLNEED_PROBE = 32
_mincore: Callable | None = None


def _libc_madvise() -> Callable | None:
    """libc's madvise, which reaches any mapping (Python's mmap.madvise only those it made; `datasets`
    maps its files in Arrow); False once MADV_DONTNEED has failed."""
    global _madvise
    if _madvise is None:
        _madvise = _libc().madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _madvise


def _mincore_sees(path: str) -> bool:
    """Whether mincore tells the page cache's pages of this file: only of a file the process owns or
    may write (or as root); of any other it says every page is there (Linux hides the page cache of
    files a process cannot change: a side channel), so a take then asks for all its pages unlooked."""
    try:
        return os.geteuid() == 0 or os.stat(path).st_uid == os.geteuid() or os.access(path, os.W_OK)
    except OSError:
        return False


def _resident(page: int) -> bool:
    """Whether page number `page` of a file mapping is in the page cache (where _mincore_sees its file)."""
    global _mincore
    if _mincore is None:
        _mincore = _libc().mincore
        _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(1)
    return _mincore(page * mmap.PAGESIZE, mmap.PAGESIZE, vec) == 0 and bool(vec.raw[0] & 1)


def _dontneed(start: int, end: int) -> None:
    """madvise(MADV_DONTNEED) on [start, end) of a file mapping (page-aligned): this process's page table
    entries go, the page cache keeps the pages and the addresses stay valid (the next read faults a
    page back in)."""
    global _madvise
    madvise = _libc_madvise()
    if madvise and madvise(start, end - start, mmap.MADV_DONTNEED):
        # e.g. locked memory (mlockall): reading is unaffected, resident memory then grows with the corpus
        say(f"warning: madvise(MADV_DONTNEED) failed ({os.strerror(ctypes.get_errno())}); the data's pages "
            "are no longer released")
        _madvise = False


def _willneed(starts: np.ndarray, ends: np.ndarray, look: bool = True) -> None:
    """Have the kernel read the pages of every [starts[i], ends[i]) (addresses in file mappings) into
    the page cache, all at once and without waiting: madvise(MADV_WILLNEED) queues the reads and maps
    nothing, so resident memory does not grow. Read by faults, the scattered rows of a batch from a
    corpus the page cache does not hold wait for one disk read after another; asked for together, the
    disk serves them side by side (measured at 50M pairs, a batch of 32,768 pairs: 62,000-113,000
    major faults and 4.7-6.9 s one fault at a time, 1.35-1.93 s read ahead; docs/benchmarks.md).
    A range spans no two mappings: those of one chunk lie in its own, and runs join only across
    gaps of WILLNEED_GAP pages, which lie between two pages of one mapping. Nothing is asked for
    where WILLNEED_PROBE pages spread over the ranges are all in the page cache already (look=False:
    not looked up, as where mincore cannot tell)."""
    madvise = _libc_madvise()
    keep = ends > starts
    if not madvise or not keep.any():
        return
    first = starts[keep] // mmap.PAGESIZE  # [k] first and last page of each range
    last = (ends[keep] - 1) // mmap.PAGESIZE
    order = np.argsort(first, kind="stable")
    first, last = first[order], np.maximum.accumulate(last[order])  # last: the furthest page up to here
    cuts = np.flatnonzero(first[1:] > last[:-1] + 1 + WILLNEED_GAP) + 1  # where a new run begins
    runs = first[np.r_[0, cuts]], last[np.r_[cuts - 1, len(first) - 1]]  # [k] first and last page of each run
    probe = runs[0][np.linspace(0, len(runs[0]) - 1, min(WILLNEED_PROBE, len(runs[0]))).astype(np.int64)]
    if look and all(_resident(page) for page in probe.tolist()):
        return
    for a, b in zip(runs[0].tolist(), runs[1].tolist()):
        madvise(a * mmap.PAGESIZE, (b - a + 1) * mmap.PAGESIZE, mmap.MADV_WILLNEED)  # a hint: failure reads by faults


class _Layout:
    """Where a column's chunks lie: the file mapping holding each chunk's buffers (-1: none, e.g. an
    in-memory table), their span (for releasing it), and, for the types read straight from the
    mapping, the position of each chunk's first offset/value in it.

    Read straight from the mapping (`direct`): text (string, large_string) and lists of text or of
    numbers, without nulls, every chunk in a file mapping. That is what the cache holds (anchor,
    positive: string; negatives: list<string>; scores: list<double>) and what hub datasets mostly do.
    A row costs a few Python operations there, where an Arrow take costs ~40 us per chunk it touches
    whatever its rows (measured): a batch of 32,768 reads ~5 rows of each chunk at 50M pairs."""

    def __init__(self, array: pa.ChunkedArray, chunks: list[pa.Array]):
        spans = file_mappings()
        starts = [a for a, _, _ in spans]
        self.mappings: list[tuple[int, int, memoryview]] = []  # (start, end, a view of it)
        self.seen = True  # mincore tells which pages of these mappings' files are in the page cache
        index: dict[int, int] = {}
        self.mapping, self.lo, self.hi = [], [], []  # per chunk: mapping index (-1: none), buffers' span
        for chunk in chunks:
            buffers = [b for b in chunk.buffers() if b is not None and b.size]
            lo = min((b.address for b in buffers), default=0)
            hi = max((b.address + b.size for b in buffers), default=0)
            i = bisect.bisect_right(starts, lo) - 1
            m = -1
            if len(chunk) and buffers and i >= 0 and hi <= spans[i][1]:
                if i not in index:
                    start, end, path = spans[i]
                    index[i] = len(self.mappings)  # the view keeps the array, hence the mapping, alive
                    self.mappings.append((start, end, memoryview(pa.foreign_buffer(start, end - start, array))))
                    self.seen &= _mincore_sees(path)
                m = index[i]
            self.mapping.append(m)
            self.lo.append(lo)
            self.hi.append(hi)
        # a chunk of no rows is never read: it may lie anywhere
        self.kind = _direct_kind(array.type) if all(m >= 0 or not len(c) for c, m in zip(chunks, self.mapping)) \
            and not any(_has_nulls(c) for c in chunks) else None
        if self.kind is not None:
            # [chunks, 2 or 3] positions in the mapping; a chunk of no rows is never read (zeros)
            none = (0,) * (2 + (self.kind[0] == "texts"))
            self.first = np.array([self._first(c, self.mappings[m][0]) if m >= 0 else none
                                   for c, m in zip(chunks, self.mapping)], dtype=np.int64)
            sizes = [self.kind[1].itemsize, self.kind[2].itemsize if self.kind[0] != "text" else 1, 1]
            if any((self.first[:, k] % sizes[k]).any() for k in range(self.first.shape[1])):
                self.kind = None  # offsets or numbers not aligned to their size (an Arrow file aligns them)
        self.map_of = np.array(self.mapping, dtype=np.int64)  # [chunks]
        self.base_of = np.array([self.mappings[m][0] if m >= 0 else 0 for m in self.mapping], dtype=np.int64)
        self._words: dict[tuple[int, str], np.ndarray] = {}

    def words(self, m: int, kind: np.dtype) -> np.ndarray:
        """Mapping m as an array of `kind` (a view: an index reads, and maps, only the page it lies on)."""
        key = (m, kind.str)
        if key not in self._words:
            start, end, view = self.mappings[m]
            self._words[key] = np.frombuffer(view, kind, count=(end - start) // kind.itemsize)
        return self._words[key]

    def _first(self, chunk: pa.Array, base: int) -> tuple[int, ...]:
        """Positions in the mapping of a chunk's first entries: (offsets, data) of text; (list offsets,
        child offsets, child data) of lists of text; (list offsets, child values) of lists of numbers."""
        kind, offsets, child = self.kind
        if kind == "text":
            _, entries, data = chunk.buffers()
            return entries.address + chunk.offset * offsets.itemsize - base, data.address - base
        lists = chunk.buffers()[1]
        values = chunk.values  # the whole child array: list offsets index it from its own offset
        first = lists.address + chunk.offset * offsets.itemsize - base
        if kind == "texts":
            _, entries, data = values.buffers()
            return first, entries.address + values.offset * child.itemsize - base, data.address - base
        return first, values.buffers()[1].address + values.offset * child.itemsize - base


# numpy types of the numbers a list column may hold, by Arrow type
_NUMBERS = {pa.float64(): "<f8", pa.float32(): "<f4", pa.int64(): "<i8", pa.int32(): "<i4", pa.int16(): "<i2",
            pa.int8(): "<i1"}


def _direct_kind(kind: pa.DataType) -> tuple | None:
    """How rows of this type are read straight from the mapping: ("text" | "texts" | "numbers", the
    numpy type of its (list) offsets, of the child's offsets (texts) or of its numbers (numbers) or
    None); None: through Arrow."""
    def offsets(wide: bool) -> np.dtype:
        return np.dtype("<i8" if wide else "<i4")

    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text", offsets(pa.types.is_large_string(kind)), None
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_type
        if pa.types.is_string(item) or pa.types.is_large_string(item):
            return "texts", offsets(pa.types.is_large_list(kind)), offsets(pa.types.is_large_string(item))
        if item in _NUMBERS:
            return "numbers", offsets(pa.types.is_large_list(kind)), np.dtype(_NUMBERS[item])
    return None


def _has_nulls(chunk: pa.Array) -> bool:
    return chunk.null_count > 0 or (hasattr(chunk, "values") and chunk.values.null_count > 0)


class _Sweep:
    """Releases what one take's reads left mapped behind them, as they move up a mapping: before a
    chunk is read, the page-table windows below the chunk's own; at the end, the rest up to the end of
    the last chunk read. What stays mapped is about one chunk and the windows around it, whatever the
    corpus's size, and pages ahead of the reading are left alone, so a take maps none twice. Every
    range lies inside its mapping (nothing else is ever released)."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.done: dict[int, int] = {}  # mapping -> this take's reads left nothing mapped from there down
        self.reach: dict[int, int] = {}  # mapping -> end of the chunks read above it

    def before(self, c: int) -> None:
        m = self.layout.mapping[c]
        if m < 0:
            return
        window = max(self.layout.mappings[m][0], self.layout.lo[c] // PTE_SPAN * PTE_SPAN)
        done = self.done.get(m)
        if done is not None and window < done:  # back below (a table holding a file's chunks twice)
            self._release(m)
            done = None
        if done is None:
            self.done[m], self.reach[m] = window, 0
        elif window > done:
            _dontneed(done, window)
            self.done[m] = window
        self.reach[m] = max(self.reach[m], self.layout.hi[c])

    def _release(self, m: int) -> None:
        end = min(self.layout.mappings[m][1], -(-self.reach[m] // PTE_SPAN) * PTE_SPAN)
        if end > self.done[m]:
            _dontneed(self.done[m], end)

    def finish(self) -> None:
        for m in self.done:
            self._release(m)


# Rows read straight from the mappings at once, between two releases behind the reading (_Sweep). A
# fault maps up to 1 MiB around its page (PTE_SPAN), so a block maps 64 MiB at most, whatever the
# corpus. A block costs a few numpy calls: at 64 rows the warm read at 50M pairs costs what the read
# row by row did (docs/benchmarks.md).
BLOCK_ROWS = 64


class _Direct:
    """Rows of a batch that are few in their chunk, read from the file mappings in steps over the whole
    batch: their offsets, then the text (or numbers, or the child's offsets, then the text) those
    locate. Each step's pages are asked for at once before it reads (_willneed); a step reads blocks of
    BLOCK_ROWS rows with numpy (one gather per block, not a call per row or per chunk) and releases
    behind it. Rows come sorted by chunk and by position in it: by address."""

    def __init__(self, layout: _Layout, chunks: np.ndarray, local: np.ndarray):
        self.layout, self.chunks = layout, chunks  # [n] each row's chunk, [n] its row in the chunk
        self.kind, self.offsets, self.child = layout.kind
        self.base = layout.base_of[chunks]  # [n] its mapping's start address
        self.first = layout.first[chunks]  # [n, 2 or 3] its chunk's buffers' positions in the mapping
        self.entry = self.first[:, 0] // self.offsets.itemsize + local  # [n] its (list) offset, in offsets
        maps = layout.map_of[chunks]
        cuts = np.flatnonzero(maps[1:] != maps[:-1]) + 1  # blocks never span two mappings
        self.blocks = [(int(maps[s]), b, min(b + BLOCK_ROWS, e)) for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(maps)])
                       for b in range(int(s), int(e), BLOCK_ROWS)]

    def ahead(self) -> tuple[np.ndarray, np.ndarray]:
        """The address ranges of the first step: each row's two offsets."""
        w = self.offsets.itemsize
        return self.base + w * self.entry, self.base + w * (self.entry + 2)

    def _ask(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """_willneed of [starts, ends), positions in each row's mapping."""
        _willneed(self.base + starts, self.base + ends, self.layout.seen)

    def _rows(self, read: Callable[[int, int, int], list]) -> list:
        """The rows' values: read(mapping, start, end) -> the values of rows start..end-1, over the blocks."""
        return [v for part in self._steps(read) for v in part]

    def _steps(self, read: Callable[[int, int, int], list | np.ndarray]) -> list:
        """[read(mapping, start, end) of each block], releasing behind the blocks as they go up."""
        sweep, parts = _Sweep(self.layout), []
        for m, s, e in self.blocks:
            sweep.before(int(self.chunks[s]))
            parts.append(read(m, s, e))
            sweep.before(int(self.chunks[e - 1]))  # what the block read below its last chunk's window
        sweep.finish()
        return parts

    def read(self) -> list:
        """The rows' values, in their order (the first step asked for ahead by the caller, with ahead())."""
        words = self.layout.words
        pairs = np.concatenate(self._steps(lambda m, s, e: words(m, self.offsets)[self.entry[s:e, None] + [0, 1]]))
        a, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)  # [n] the row's span in the data / child
        if self.kind == "text":
            return self._decoded(self.first[:, 1] + a, self.first[:, 1] + b)
        w = self.child.itemsize
        at, size = self.first[:, 1] // w + a, b - a  # [n] the first item's index in the mapping as `child`s, items
        extra = int(self.kind == "texts")  # k texts have k + 1 ends
        self._ask(w * at, w * (at + size + extra))
        items = self._rows(lambda m, s, e: [words(m, self.child)[x:x + k + extra].tolist() for x, k in
                                            zip(at[s:e].tolist(), size[s:e].tolist())])
        if self.kind == "numbers":  # items: [n] a row's numbers, or the k + 1 ends of its k texts in the data
            return items
        data = self.first[:, 2]  # [n] the child's data in the mapping
        self._ask(data + np.array([e[0] for e in items]), data + np.array([e[-1] for e in items]))
        mappings = self.layout.mappings
        return self._rows(lambda m, s, e: [[str(mappings[m][2][d + x:d + y], "utf-8") for x, y in zip(ends, ends[1:])]
                                           for d, ends in zip(data[s:e].tolist(), items[s:e])])

    def _decoded(self, starts: np.ndarray, ends: np.ndarray) -> list[str]:
        """The text of bytes [starts, ends) (positions in each row's mapping), asked for ahead first."""
        self._ask(starts, ends)
        mappings = self.layout.mappings
        return self._rows(lambda m, s, e: [str(mappings[m][2][x:y], "utf-8") for x, y in
                                           zip(starts[s:e].tolist(), ends[s:e].tolist())])


class Column(Rows):
    """One field of an Arrow table as a read-only sequence; `take(rows)` fetches a batch's rows at once.

    `check` (hub datasets, which are not converted): the name of the field, so that a missing or empty
    text is refused when a batch reads it, naming the row. Where the table lies in a read-only file
    mapping (the cache's parts; a `datasets` Arrow file), a take asks for the pages of all its rows
    ahead (_willneed) and reads them in address order, releasing the pages behind it as it goes
    (_Sweep): resident memory holds about one chunk's pages, whatever the corpus's size. An in-memory
    table is never released."""

    def __init__(self, array: pa.ChunkedArray, origin: str = "", check: str | None = None, width: int | None = None):
        self.array, self.origin, self.check, self.width = array, origin, check, width
        # Row offsets of the chunks: a take looks its rows up per chunk, as ChunkedArray.take
        # concatenates the chunks first (a copy of the whole column: 1.4 GB at 10M pairs, measured).
        chunks = array.chunks  # a new list of wrappers at each access
        self.starts = np.cumsum([0] + [len(c) for c in chunks])
        self.layout = _Layout(array, chunks)

    def __len__(self) -> int:
        return len(self.array)

    def take(self, rows: Sequence[int]) -> list:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        order = np.argsort(rows, kind="stable")  # [n] positions by row: chunk by chunk, by address within one
        ordered = rows[order]
        chunks = np.searchsorted(self.starts, ordered, side="right") - 1  # [n] each row's chunk
        local = ordered - self.starts[chunks]  # [n] its row within the chunk
        values = self._read(chunks, local)
        out: list = [None] * len(rows)
        for i, v in zip(order.tolist(), values):
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

    def _read(self, chunks: np.ndarray, local: np.ndarray) -> list:
        """The values of rows given by chunk and row in it ([n] each, in address order). A chunk with
        ARROW_ROWS of them or more goes through Arrow (its whole span asked for ahead where it is
        mapped); the others' rows are read straight from the mappings (_Direct), their first step asked
        for together with those spans."""
        cuts = np.flatnonzero(chunks[1:] != chunks[:-1]) + 1
        firsts, lasts = np.r_[0, cuts], np.r_[cuts, len(chunks)]  # [g] each chunk's rows: firsts[i]:lasts[i]
        dense = lasts - firsts >= ARROW_ROWS if self.layout.kind is not None else np.ones(len(firsts), bool)
        sparse = np.repeat(~dense, lasts - firsts)  # [n] rows read straight from the mapping
        direct = _Direct(self.layout, chunks[sparse], local[sparse]) if sparse.any() else None
        groups = [(int(chunks[s]), int(s), int(e)) for s, e in zip(firsts[dense], lasts[dense])]
        mapped = [c for c, _, _ in groups if self.layout.mapping[c] >= 0]
        starts, ends = direct.ahead() if direct else (np.zeros(0, np.int64),) * 2
        _willneed(np.concatenate([starts, np.array([self.layout.lo[c] for c in mapped], dtype=np.int64)]),
                  np.concatenate([ends, np.array([self.layout.hi[c] for c in mapped], dtype=np.int64)]),
                  self.layout.seen)
        values: list = [None] * len(chunks)
        sweep = _Sweep(self.layout)
        for c, s, e in groups:
            sweep.before(c)
            values[s:e] = self.array.chunk(c).take(pa.array(local[s:e], pa.int64())).to_pylist()
        sweep.finish()
        if direct:
            for i, v in zip(np.flatnonzero(sparse).tolist(), direct.read()):
                values[i] = v
        return values


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

    def __init__(self, columns: list[tuple[str, pa.ChunkedArray]], num: int, origin: str = "", check: bool = False):
        self.parts = [(key, Column(a, origin, key if check and not pa.types.is_list(a.type) else None),
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
