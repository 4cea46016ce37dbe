"""Bucketed decode shapes (server/engine/shapes.py)."""

from __future__ import annotations

from server.engine.shapes import MIN_LEN_BUCKET, bucket, len_buckets, row_buckets, token_bucket


def test_row_buckets_cover_every_batch_with_few_shapes() -> None:
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert row_buckets(5) == [1, 2, 4, 5] and row_buckets(1) == [1]
    for max_rows in (1, 3, 64, 100, 256, 1000):
        buckets = row_buckets(max_rows)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_rows
        for n in range(1, max_rows + 1):
            b = bucket(n, buckets)
            assert n <= b <= max_rows and (b <= 8 or b - n < max(16, b // 3))
    assert len(row_buckets(256)) <= 16


def test_len_buckets_double_up_to_the_context() -> None:
    assert len_buckets(2048) == [128, 256, 512, 1024, 2048]
    assert len_buckets(96) == [96] and len_buckets(MIN_LEN_BUCKET) == [MIN_LEN_BUCKET]
    buckets = len_buckets(3000)
    assert buckets[-1] == 3000 and bucket(2049, buckets) == 3000 and bucket(1, buckets) == 128


def test_token_buckets_are_few_and_waste_at_most_an_eighth() -> None:
    sizes = {token_bucket(n) for n in range(1, 4097)}
    assert len(sizes) == 53 and max(sizes) == 4096
    assert all(token_bucket(n) == bucket(n, row_buckets(128)) for n in range(1, 129))
    assert [token_bucket(n) for n in (129, 144, 145, 257, 1000, 4097)] == [
        *(144, 144, 160, 288, 1024, 4608)
    ]
    assert all(n <= token_bucket(n) <= n * 1.125 for n in range(129, 20000))
