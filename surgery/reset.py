"""Half reset's selection (the spec and the paper: ``surgery/methods/half_reset.py``).

Per block (a transformer layer), with n units (its matrices, or the elements of its matrices):

    exactly k = floor(fraction * n) units := base,  the other n - k := fine-tune   (bit for bit)

Which units: a seeded permutation pi of 0..n-1 (unit j is reset iff pi(j) < k), or the relative
update of each unit: r_j = ||f_j - b_j||_F / ||b_j||_F of a matrix, r_i = |f_i - b_i| / |b_i| of an
element (float32; inf where b_i = 0 != f_i, 0 where both are 0). ``smallest-update`` resets the k
units the fine-tune changed least, ``largest-update`` the k it changed most; ties by lower position.
Elements are ranked exactly over the whole block by radix select (``ranks.group_bands``).

The permutation is counter-based: a 4-round Feistel network on 2^(2h) >= n keyed by
(seed, block), with cycle-walking back into 0..n-1. pi(j) depends on nothing but (seed, block, j), so
the result never depends on chunking, threads or order, and exactly k units are reset (pi is a
bijection). A block's elements are numbered across its matrices in name order, row-major inside each.

"Matrices" are the float tensors of two or more dimensions inside the blocks. Vectors (norms,
biases) and everything outside the blocks (embeddings, head, final norm) keep the fine-tune's values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from surgery.names import natural_key, place
from surgery.ranks import Band, group_bands, rank_count


@dataclass(frozen=True)
class ResetRule:
    """How one block matrix is written: all base, all fine-tune, or by element.

    By element, element ``i`` of the tensor is reset iff pi(offset + i) < k, with pi the block's
    permutation of 0..n-1 under ``key``."""

    whole: bool | None  # True: all base; False: all fine-tune; None: by element
    key: int = 0
    offset: int = 0
    n: int = 0
    k: int = 0
    band: Band | None = None  # by element and update size: this tensor's part of the block's top-k
    select: str = "random"

    def fresh(self) -> Band | None:
        """A run's own copy of the band (its tie counter advances chunk by chunk, in order)."""
        return None if self.band is None else replace(self.band, seen=np.zeros(2, np.int64))

    def mask(
        self, start: int, count: int, base: np.ndarray, ft: np.ndarray, backend, band: Band | None = None
    ) -> np.ndarray:
        """True where elements start..start+count-1 of the tensor are reset to the base. ``band``:
        this run's ``fresh()`` copy of ``self.band``."""
        if self.whole is not None:
            return np.full(count, self.whole)
        if band is None:
            pos = np.arange(self.offset + start, self.offset + start + count, dtype=np.uint64)
            return permute(pos, self.n, self.key) < np.uint64(self.k)
        x = reset_key(base, ft, self.select == "smallest-update")
        idx, val = np.empty(count, np.int64), np.empty(count, np.float32)
        n = backend.band_select(x, band.v_hi, band.ties_hi, band.v_lo, band.ties_lo, band.seen, 0, idx, val)
        mask = np.zeros(count, bool)
        mask[idx[:n]] = True
        return mask


_INF_BITS = np.uint32(0x7F800000)


def reset_key(base: np.ndarray, ft: np.ndarray, smallest: bool) -> np.ndarray:
    """A float32 key whose k largest values are the elements to reset: the relative update
    r = |f - b| / |b| (``largest-update``), or a value decreasing in r (``smallest-update``:
    bits(inf) - bits(r), exact and order-reversing on 0 <= r <= inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(ft - base) / np.abs(base)
    r = np.where(np.isnan(r), np.where(ft == base, np.float32(0), np.float32(np.inf)), r).astype(np.float32)
    if not smallest:
        return r
    return (_INF_BITS - r.view(np.uint32)).view(np.float32)


def block_matrices(names: Sequence[str], shapes: dict[str, tuple[int, ...]]) -> dict[int, list[str]]:
    """Block index -> its matrices (float tensors with >= 2 dims), in name order."""
    blocks: dict[int, list[str]] = {}
    for name in sorted(names, key=natural_key):
        block = place(name).block
        if block is not None and len(shapes[name]) >= 2:
            blocks.setdefault(block, []).append(name)
    return blocks


def reset_rules(
    names: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    params: dict,
    scores: dict[str, float] | None = None,
    bands: dict[str, Band] | None = None,
) -> dict[str, ResetRule]:
    """A rule for every block matrix (tensors without one keep the fine-tune).

    ``select`` other than ``random`` needs ``scores`` (by matrix: each matrix's relative update) or
    ``bands`` (by element: each matrix's share of its block's top-k ``reset_key``, ``element_bands``)."""
    fraction, by, select = float(params["fraction"]), params["by"], params["select"]
    seed = int(params["seed"])
    assert by != "element" or select == "random" or bands is not None, "by element needs the bands"
    rules: dict[str, ResetRule] = {}
    for block, members in block_matrices(names, shapes).items():
        key = block_key(seed, block)
        if by == "element":
            sizes = [int(np.prod(shapes[m])) for m in members]
            n = sum(sizes)
            k = rank_count(fraction, n)
            offset = 0
            for m, size in zip(members, sizes):
                band = None if select == "random" else bands[m]
                rules[m] = ResetRule(None if 0 < k < n else k == n, key, offset, n, k, band, select)
                offset += size
            continue
        n = len(members)
        k = rank_count(fraction, n)
        if select == "random":
            pi = permute(np.arange(n, dtype=np.uint64), n, key)
            chosen = {m for m, p in zip(members, pi) if p < k}
        else:
            assert scores is not None
            sign = 1.0 if select == "smallest-update" else -1.0
            order = sorted(range(n), key=lambda j: (sign * scores[members[j]], j))
            chosen = {members[j] for j in order[:k]}
        for m in members:
            rules[m] = ResetRule(m in chosen)
    return rules


def pick_rules(
    jobs: Sequence, params: dict, backend, parallel: Callable, chunks: Callable
) -> dict[str, ResetRule]:
    """``Pick.rules`` of half reset: the reduce pass the selection needs (none for a permutation,
    each matrix's relative update, or block-wide element ranks), then a rule per block matrix."""
    by_name = {j.name: j for j in jobs}
    names, shapes = list(by_name), {n: j.shape for n, j in by_name.items()}
    scores = bands = None
    if params["select"] != "random" and params["by"] == "matrix":
        matrices = [j for j in jobs if len(j.shape) >= 2]
        scores = dict(
            zip((j.name for j in matrices), parallel(lambda j: relative_update(chunks(j)), matrices))
        )
    elif params["select"] != "random":
        smallest = params["select"] == "smallest-update"

        def key_chunks(name: str) -> Iterable[np.ndarray]:
            return (reset_key(x0, x1, smallest) for x0, x1 in chunks(by_name[name]))

        bands = element_bands(names, shapes, params, key_chunks, backend, parallel)
    return reset_rules(names, shapes, params, scores, bands)


def relative_update(chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """||f - b||_F / ||b||_F in float64 (inf for a zero base that moved, 0 when nothing moved)."""
    sums = np.zeros(2, np.float64)
    for b, f in chunks:
        b64, d = b.astype(np.float64), f.astype(np.float64) - b.astype(np.float64)
        sums += (np.dot(d, d), np.dot(b64, b64))
    if sums[1] == 0.0:
        return float("inf") if sums[0] > 0.0 else 0.0
    return float(np.sqrt(sums[0] / sums[1]))


def element_bands(
    names: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    params: dict,
    key_chunks: Callable[[str], Iterable[np.ndarray]],
    backend,
    pmap: Callable,
) -> dict[str, Band]:
    """By element and update size: per block, the exact top-floor(fraction * n) of ``reset_key``
    over its matrices (``key_chunks(name)`` streams one matrix's keys), as one Band per matrix."""
    bands: dict[str, Band] = {}
    for members in block_matrices(names, shapes).values():
        k = rank_count(float(params["fraction"]), sum(int(np.prod(shapes[m])) for m in members))
        streams = [lambda m=m: key_chunks(m) for m in members]
        bands.update(zip(members, group_bands(streams, k, backend, pmap)))
    return bands


def block_key(seed: int, block: int) -> int:
    """64-bit key of one block's permutation."""
    digest = hashlib.blake2b(f"half_reset\0{seed}\0{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _round(x: np.ndarray, key: int, r: int, mask: np.ndarray) -> np.ndarray:
    """Feistel round function: splitmix64 finaliser of (x, key, round), cut to the half width."""
    z = x + np.uint64((key + 0x9E3779B97F4A7C15 * (r + 1)) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return (z ^ (z >> np.uint64(31))) & mask


def permute(x: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """pi(x) for x in 0..n-1: a keyed bijection of 0..n-1 (Feistel network + cycle-walking)."""
    if n <= 1:
        return np.zeros_like(x)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    out = x.astype(np.uint64, copy=True)
    todo = np.ones(out.size, bool)
    with np.errstate(over="ignore"):
        while todo.any():  # cycle-walking: re-encrypt until the value falls back into 0..n-1
            v = out[todo]
            left, right = v >> shift, v & mask
            for r in range(rounds):
                left, right = right, left ^ _round(right, key, r, mask)
            out[todo] = (left << shift) | right
            todo[todo] = out[todo] >= np.uint64(n)
    return out
