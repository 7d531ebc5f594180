"""This rank's batches prepared ahead of the step: read, tokenized and collated in worker threads.

    Prefetcher(mixture, sources, encoder, rank, world, workers).next() -> Batch     (in order)

`collate` makes the batch from a rank's picks and the encoder's tokenize: data.collate (texts,
for an embedder) or data.collate_pairs ((query, passage) pairs, for a cross-encoder).

The global batches are still drawn in order from a copy of the mixture (it is a pure function of
step and cursors, so drawing ahead changes nothing); only the reading and tokenizing of this rank's
slice runs in the threads. The trainer's own mixture is advanced to a batch's position when that
batch is handed out, so a checkpoint records what was trained on, not what was prepared.

Threads, not processes: Arrow reads and the fast tokenizers run in native code that releases the
GIL, and threads share the memory-mapped sources at no cost. Each thread tokenizes with its own copy
of the tokenizer: a Rust tokenizer whose settings are changed (truncation on for texts, off for a
prompt alone) while another thread encodes with it fails with "Already borrowed".

Streamed sources (streaming.py) are read in order on the calling thread, where the global batches
are drawn; their records then go to a thread for tokenizing. The stream positions recorded with each
batch are what a checkpoint saves.

Token ids stay unpadded lists: chunks are padded (and moved to the device) by the gradient cache on
the training thread, so there is no batch tensor to pin here.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

from train.data import Batch, Mixture, PairBatch, Source, collate, fetch, shard
from train.streaming import positions


class Prefetcher:
    def __init__(self, mixture: Mixture, sources: Sequence[Source], encoder, rank: int, world: int, workers: int,
                 collate: Callable = collate):
        self.mixture, self.sources, self.encoder, self.rank, self.world = mixture, sources, encoder, rank, world
        self.collate = collate
        self.waited = 0.0  # seconds next() spent waiting for data since the last take_waited()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch") if workers else None
        self.ahead = copy.deepcopy(mixture)  # draws the batches being prepared
        self.queue: deque[tuple[Future, dict]] = deque()
        self.depth = 2 * workers  # batches in flight: each worker busy, one more waiting per worker
        self.local = threading.local()
        # this rank's stream positions after the last batch handed out (None: nothing streamed): what a
        # checkpoint records, not where the reading ahead has got to
        self.streaming = any(s.streaming for s in sources)
        self.streams = positions(sources)
        for _ in range(self.depth):
            self._submit()

    def _tokenize(self, texts, side=None, **kw):
        if not hasattr(self.local, "encoder"):  # this thread's own tokenizer (see the module docstring)
            own = copy.copy(self.encoder)
            own.tokenizer = copy.deepcopy(self.encoder.tokenizer)
            self.local.encoder = own
        return self.local.encoder.tokenize(texts, side, **kw)

    def _submit(self) -> None:
        picks = shard(self.ahead.next_batch(), self.rank, self.world)
        records = None
        if self.streaming:  # a stream is read in order, here; only tokenizing goes to the threads
            records = fetch(self.sources, picks)
        future = self.pool.submit(self.collate, self.sources, picks, self._tokenize, records)
        self.queue.append((future, self.ahead.state_dict(), positions(self.sources)))

    def next(self) -> Batch | PairBatch:
        t0 = time.perf_counter()
        if self.pool is None:  # in line: the step waits for all of it
            batch = self.collate(self.sources, shard(self.mixture.next_batch(), self.rank, self.world),
                            self.encoder.tokenize)
            self.streams = positions(self.sources)
        else:
            future, state, self.streams = self.queue.popleft()
            batch = future.result()  # re-raises a worker's error (a bad row) here, in the training thread
            self.mixture.load_state_dict(state)
            self._submit()
        self.waited += time.perf_counter() - t0
        return batch

    def position(self) -> tuple[dict, list[dict] | None]:
        """Where the data stands after the last batch handed out: the mixture's and the streams' positions."""
        return self.mixture.state_dict(), self.streams

    def rewind(self, position: tuple[dict, list[dict] | None]) -> None:
        """Back to an earlier `position()` (a step given up before its checkpoint): what a checkpoint
        records from now on. The batches read ahead stay queued: the run stops after that checkpoint."""
        state, self.streams = position
        self.mixture.load_state_dict(state)

    def take_waited(self) -> float:
        waited, self.waited = self.waited, 0.0
        return waited

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
