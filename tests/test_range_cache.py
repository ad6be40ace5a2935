"""The sparse range cache of streamed inputs (surgery.remote.RangeCache), without any network."""

from __future__ import annotations

import random

import numpy as np

from surgery.remote import RangeCache, _insert


def test_insert_keeps_sorted_disjoint_spans():
    rng = random.Random(0)
    for _ in range(200):
        spans: list[list[int]] = []
        covered: set[int] = set()
        for _ in range(rng.randint(1, 12)):
            start = rng.randint(0, 60)
            end = start + rng.randint(1, 15)
            _insert(spans, start, end)
            covered |= set(range(start, end))
        flat = [b for span in spans for b in range(*span)]
        assert sorted(flat) == sorted(covered) and len(flat) == len(set(flat))
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # touching spans are merged


def test_cache_serves_only_what_it_holds_and_survives_reopening(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    cache = RangeCache(tmp_path / "c")
    buf = np.zeros(100, np.uint8)
    assert not cache.read("f", 0, memoryview(buf))  # nothing yet
    cache.store("f", 1000, memoryview(data[1000:3000]))
    cache.store("f", 3000, memoryview(data[3000:3500]))
    assert cache.read("f", 2900, memoryview(buf)) and np.array_equal(buf, data[2900:3000])
    assert not cache.read("f", 3450, memoryview(buf))  # 3500.. was never fetched
    cache.close()
    again = RangeCache(tmp_path / "c")  # a later run: the list was saved with the data
    big = np.zeros(2500, np.uint8)
    assert again.read("f", 1000, memoryview(big)) and np.array_equal(big, data[1000:3500])
    assert again.bytes == 2500
    (tmp_path / "c" / "f").write_bytes(b"")  # the data lost: the list is not trusted
    assert not RangeCache(tmp_path / "c").read("f", 1000, memoryview(buf))
