"""A seeded permutation of [0, n) that is computed one position at a time: O(1) time and memory per index.

    permute(positions, n, key) -> rows     positions, rows: int64 arrays of the same shape

The sampler walks each source in a fresh order every epoch. Materialising that order
(`rng.permutation(n)`) costs O(n) per call: at 41M rows 2.1 s and 328 MB on every rank, per step
(issue 14). Instead the order is a keyed bijection evaluated only at the positions a batch needs:
a Feistel network over the smallest power of two >= n, and "cycle walking" for the positions that
land outside [0, n) (apply the network again until the value is in range; Black & Rogaway,
"Ciphers with Arbitrary Finite Domains", CT-RSA 2002). Since the network is a bijection of
[0, 2^k) and 2^k < 2n, walking maps [0, n) onto itself one-to-one, with fewer than 2 rounds of the
network per index on average.

The network is unbalanced when k is odd: the halves have a and b = k - a bits and swap sizes every
round, so an even number of rounds returns them to (a, b). Each round is invertible whatever the
round function is, which is why the construction is a bijection by design; tests/test_sampler.py
checks it by brute force anyway.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6  # even (the halves' sizes swap every round); 4+ rounds of a good mixer look random (Luby-Rackoff)
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser constants (Stafford's "Mix13")
_M2 = np.uint64(0x94D049BB133111EB)


def keys(seed: int, *stream: int) -> np.ndarray:
    """ROUNDS 64-bit round keys for one stream, e.g. (seed, source, epoch): distinct streams, unrelated orders."""
    return np.random.default_rng([seed, 7919, *stream]).integers(0, 2**63, size=ROUNDS, dtype=np.uint64)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit avalanche of (x, key): the Feistel round function (uint64 arithmetic wraps by design)."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, a: int, b: int, round_keys: np.ndarray) -> np.ndarray:
    """One pass of the network over [0, 2^(a+b)): x = L * 2^b + R, L of a bits, R of b bits."""
    left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
    for key in round_keys:
        # (L, R) -> (R, L ^ F(R) mod 2^a): the new left has b bits, the new right a bits.
        left, right = right, left ^ (_mix(right, key) & np.uint64((1 << a) - 1))
        a, b = b, a
    return (left << np.uint64(b)) | right


def permute(positions: np.ndarray, n: int, round_keys: np.ndarray) -> np.ndarray:
    """The rows at `positions` (each in [0, n)) of the permutation of [0, n) keyed by `round_keys`."""
    pos = np.asarray(positions, dtype=np.int64)
    if n < 1 or pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(f"positions must lie in [0, {n})")
    if n == 1:
        return np.zeros_like(pos)
    k = max(2, int(n - 1).bit_length())  # 2^k >= n, and both halves at least one bit
    a = k // 2
    x = pos.astype(np.uint64)
    y = _feistel(x, a, k - a, round_keys)
    out = y >= np.uint64(n)
    while out.any():  # cycle walking: values outside [0, n) go round again
        y[out] = _feistel(y[out], a, k - a, round_keys)
        out = y >= np.uint64(n)
    return y.astype(np.int64)
