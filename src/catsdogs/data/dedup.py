"""Exact and near-duplicate groups without comparing every pair.

Exact duplicates share a SHA-256 of their original bytes. Near-duplicates are perceptual hashes
(64-bit pHash) within ``max_distance`` bits. Instead of 2×10⁸ comparisons for 20,000 images we
**band** the hash: cut the 64 bits into ``max_distance + 1`` segments; two hashes that differ in at
most ``max_distance`` bits must agree exactly on at least one segment (pigeonhole), so only
images sharing a segment value are compared. Pairs found are joined with union-find, so a group is
a connected component ("A≈B and B≈C" puts A, B, C in one group even if A and C are further apart):
the conservative choice for keeping look-alikes out of different splits.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable


class UnionFind:
    """Disjoint sets over hashable keys, with path halving and union by size."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._parent: dict[str, str] = {}
        self._size: dict[str, int] = {}
        for key in keys:
            self.add(key)

    def add(self, key: str) -> None:
        if key not in self._parent:
            self._parent[key] = key
            self._size[key] = 1

    def find(self, key: str) -> str:
        parent = self._parent
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def union(self, a: str, b: str) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if self._size[root_a] < self._size[root_b]:
            root_a, root_b = root_b, root_a
        self._parent[root_b] = root_a
        self._size[root_a] += self._size[root_b]

    def groups(self) -> list[list[str]]:
        """Every set, each sorted, the list sorted by its first key (deterministic output)."""
        members: dict[str, list[str]] = defaultdict(list)
        for key in self._parent:
            members[self.find(key)].append(key)
        return sorted((sorted(group) for group in members.values()), key=lambda g: g[0])


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _bands(bits: int, count: int) -> list[tuple[int, int]]:
    """(shift, mask) of ``count`` contiguous segments covering ``bits`` bits as evenly as possible."""
    bounds = [round(i * bits / count) for i in range(count + 1)]
    return [(low, (1 << (high - low)) - 1) for low, high in itertools.pairwise(bounds)]


def near_duplicate_pairs(
    hashes: dict[str, str], *, max_distance: int, bits: int = 64
) -> list[tuple[str, str]]:
    """Pairs of keys whose hex hashes are within ``max_distance`` bits, found via banding.

    Keys with identical hashes are linked to the first of them only (enough for grouping).

    Args:
        hashes: key (here the content SHA-256) → perceptual hash as hex.
        max_distance: inclusive Hamming-distance threshold; ``<0`` disables near-duplicate search.
        bits: hash length in bits.

    Returns:
        Sorted pairs ``(a, b)`` with ``a < b``, each once, that connect every near-duplicate group.
    """
    if max_distance < 0:
        return []
    # Identical hashes (e.g. many blank images) are joined directly, so buckets hold distinct values
    # and a pathological data set cannot make a bucket quadratic in its number of images.
    by_value: dict[int, list[str]] = defaultdict(list)
    for key in sorted(hashes):
        by_value[int(hashes[key], 16)].append(key)
    pairs: set[tuple[str, str]] = set()
    for keys in by_value.values():
        pairs.update((keys[0], other) for other in keys[1:])
    close: set[tuple[int, int]] = set()
    for shift, mask in _bands(bits, max_distance + 1):
        buckets: dict[int, list[int]] = defaultdict(list)
        for value in by_value:
            buckets[(value >> shift) & mask].append(value)
        for bucket in buckets.values():
            for i, a in enumerate(bucket):
                for b in bucket[i + 1 :]:
                    if hamming(a, b) <= max_distance:
                        close.add((min(a, b), max(a, b)))
    for a, b in close:
        first, second = by_value[a][0], by_value[b][0]
        pairs.add((min(first, second), max(first, second)))
    return sorted(pairs)


def near_duplicate_groups(hashes: dict[str, str], *, max_distance: int) -> list[list[str]]:
    """Connected components of the near-duplicate graph (singletons included), deterministic order."""
    union_find = UnionFind(sorted(hashes))
    for a, b in near_duplicate_pairs(hashes, max_distance=max_distance):
        union_find.union(a, b)
    return union_find.groups()
