"""Groups of near-duplicate images, from their perceptual hashes (the server's ``phash``: 16 hex digits).

The client decodes no image (it has no Pillow): the server computes each hash,
for a stored image at upload and for a local file when it is sent to
``POST /images/similar``. Here the hashes are grouped: two images within
``max_distance`` bits are in one group, and so are the images linked through them
(single linkage, as a person clears a folder of bursts).

PERF: not every pair is compared: as the server's index does, each 64-bit hash is cut into four
16-bit bands, and two hashes within ``d`` bits have a band within ``d // 4`` bits of the
other's (pigeonhole); only the hashes sharing such a band value are compared.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

_BANDS = 4
_BAND_BITS = 16


def groups(hashes: dict[str, str], max_distance: int, links: Iterable[tuple[str, str]] = ()) -> list[list[str]]:
    """The groups of two or more members whose hashes are within ``max_distance`` bits, largest first.

    ``hashes``: each member's phash (hex); ``links``: pairs already known to be near (the server's
    matches), joined too. Members keep the order of ``hashes`` within a group.
    """
    order = {member: position for position, member in enumerate(hashes)}
    parent = {member: member for member in hashes}

    def root(member: str) -> str:
        while parent[member] != member:
            parent[member] = parent[parent[member]]
            member = parent[member]
        return member

    def join(a: str, b: str) -> None:
        first, second = sorted((root(a), root(b)), key=lambda m: order.get(m, len(order)))
        parent[second] = first

    values = {member: int(phash, 16) for member, phash in hashes.items()}
    radius = max_distance // _BANDS
    flips = [0] + [
        sum(1 << bit for bit in bits)
        for count in range(1, radius + 1)
        for bits in itertools.combinations(range(_BAND_BITS), count)
    ]
    buckets: list[dict[int, list[str]]] = [defaultdict(list) for _ in range(_BANDS)]
    for member, value in values.items():
        for band in range(_BANDS):
            buckets[band][_band(value, band)].append(member)
    for member, value in values.items():
        for band in range(_BANDS):
            own = _band(value, band)
            for flip in flips:
                for other in buckets[band].get(own ^ flip, ()):
                    if other != member and ((value ^ values[other]).bit_count() <= max_distance):
                        join(member, other)
    for a, b in links:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        join(a, b)
    found: dict[str, list[str]] = defaultdict(list)
    for member in parent:
        found[root(member)].append(member)
    return sorted((members for members in found.values() if len(members) > 1), key=len, reverse=True)


def distance(a: str, b: str) -> int:
    """The Hamming distance of two phashes (hex)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _band(value: int, band: int) -> int:
    return (value >> (_BAND_BITS * (_BANDS - 1 - band))) & 0xFFFF
