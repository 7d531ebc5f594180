"""Batches prepared in worker threads are the batches prepared in line, in order, and the mixture
position a checkpoint saves is that of the batches handed out, not of those prepared ahead."""

from __future__ import annotations

import pytest

from train.data import Mixture, Source, collate, shard
from train.errors import UserError
from train.prefetch import Prefetcher


class Encoder:
    tokenizer = None

    def tokenize(self, texts, side=None, instruction=None):
        return [[len(t), sum(map(ord, t)) % 1000] for t in texts]


def make():
    sources = [Source("a", [f"a{i}" for i in range(37)], [f"p{i}" for i in range(37)], [], None),
               Source("b", [f"bb{i}" for i in range(50)], [f"q{i}" for i in range(50)], [], None)]
    return sources, Mixture(sizes=[37, 50], weights=[None, None], homogeneous=[False, False], batch_size=8, seed=5)


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_hand_out_the_inline_batches_in_order(workers):
    sources, reference = make()
    expected = [collate(sources, shard(reference.next_batch(), 1, 2), Encoder().tokenize) for _ in range(30)]
    states = []
    ref2 = make()[1]
    for _ in range(30):
        ref2.next_batch()
        states.append(ref2.state_dict())
    sources, mixture = make()
    with Prefetcher(mixture, sources, Encoder(), 1, 2, workers) as data:
        for want, state in zip(expected, states):
            got = data.next()
            assert got.query_ids == want.query_ids and got.passage_ids == want.passage_ids
            assert mixture.state_dict() == state  # what a checkpoint at this step saves
        assert data.take_waited() > 0 and data.take_waited() == 0


def test_a_workers_error_is_raised_by_next():
    sources, mixture = make()
    sources[0] = Source("a", [f"a{i}" for i in range(37)], [f"p{i}" for i in range(37)], [["x"]] * 37, None)
    with Prefetcher(mixture, sources, Encoder(), 0, 1, 2) as data, pytest.raises(UserError, match="negatives"):
        for _ in range(10):
            data.next()
