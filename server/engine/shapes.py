"""Bucketed decode shapes, for a decode step captured in CUDA graphs (one graph per shape).

A static decode pads its batch up to the next row bucket and attends to the next length bucket
of KV columns, so a server that decodes every batch size from 1 to ``max_rows`` at every
length up to ``max_len`` replays a few dozen recorded graphs instead of recording one per step.
"""

from __future__ import annotations

import bisect

MIN_LEN_BUCKET = 128


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 32, every 16 up to 128, every 64 beyond; max_rows last."""
    out: list[int] = []
    n = 1
    while n < max_rows:
        out.append(n)
        n = n * 2 if n < 8 else n + (8 if n < 32 else 16 if n < 128 else 64)
    return [*out, max_rows]


def token_bucket(n: int) -> int:
    """A forward's token count rounded up to one of a few sizes: as ``row_buckets`` up to 128
    (1, 2, 4, 8, then every 8 up to 32, every 16 up to 128), then eight sizes per doubling
    (144, 160, ... 256, 288, ... 512, ...): at most 12.5% more rows, ~8 sizes per octave."""
    if n <= 8:
        return 1 << max(0, n - 1).bit_length()
    step = 8 if n <= 32 else 16 if n <= 128 else 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


def len_buckets(max_len: int) -> list[int]:
    """Powers of two from ``MIN_LEN_BUCKET``; max_len last."""
    out: list[int] = []
    n = MIN_LEN_BUCKET
    while n < max_len:
        out.append(n)
        n *= 2
    return [*out, max_len]


def bucket(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n (buckets ascending; n <= buckets[-1])."""
    return buckets[bisect.bisect_left(buckets, n)]
