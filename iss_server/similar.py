"""Near-duplicate images: a 64-bit perceptual hash and an index that finds hashes close to one.

The hash (:func:`perceptual_hash`) is the DCT hash of pHash: the image reduced to
32x32 grey levels, its 2-D DCT, the 8x8 lowest frequencies *after* the DC row and
column compared with their median, one bit each. Altered copies of an image
(resized, re-encoded, slightly cropped, brightened, converted to WebP) land within
a few bits of it; unrelated images land near 32 bits apart. Why DCT rather than
the cheaper dHash: on ``bench/near_duplicates.py``'s 3,000 pictures at distance 10,
pHash finds 98.8 % of the altered copies with 14 false pairs in 4.5 million, dHash
(9x8 gradients) 97.5 % with 7,613 (its bits follow noise and JPEG's blocks); both
cost ~1 ms of pure Python.

The index (:class:`SimilarIndex`) is multi-index hashing: each hash is stored with
its four 16-bit bands in four indexed columns. Two hashes within distance ``d``
have at least one band within distance ``d // 4`` of the query's (pigeonhole: if
every band differed by more, the whole would differ by at least
``4 * (d // 4 + 1) > d``). A query therefore looks up, by index, every band value
within that small radius of the query's bands, and then computes the exact
distance of those candidates only: no scan of the table, and the answer is
exact, never approximate, for every ``max_distance`` up to :data:`MAX_DISTANCE`.
The cost grows with ``d // 4``: up to distance 3 it is 4 exact band values, up to 7
it is 4 x 17, up to 11 it is 4 x 137; at a million hashes a query up to 11 takes
~12 ms at the median, up to 15 ~65-120 ms (``bench/similar_index.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import combinations
from operator import mul
from typing import Any

from PIL import Image

from iss_server import placeholders

#: The distance under which two images are taken for copies of one another. NOTE: on
#: ``bench/near_duplicates.py``'s 3,000 pictures x 5 alterations: at 10, 98.8 % of the copies found
#: (crops of up to 5 %: 94 %; the others 100 %), 0.8 % of the pictures with a false neighbour; at 8,
#: 97.2 % and none; at 12, 99.5 % and 3.5 %. 8 and 10 cost the same (both look 2 bits around each band).
DEFAULT_DISTANCE = 10
#: The largest radius a query may ask for: past it a band's neighbourhood grows to thousands of values
#: and random pairs (32 bits apart on average) start to answer.
MAX_DISTANCE = 16

BANDS = 4
_BAND_BITS = 64 // BANDS
_BAND_MASK = (1 << _BAND_BITS) - 1
_MASK = (1 << 64) - 1

_SIDE = 32  # NOTE: pHash's reduction: small enough to ignore detail, large enough for 8 frequencies
_FREQUENCIES = range(1, 9)  # NOTE: the DC row and column say only how bright; the next 8 say the shape
# PERF: the DCT-II basis for those frequencies, computed once: a hash costs ~0.4 ms of pure Python.
_BASIS = [[math.cos(math.pi * (2 * n + 1) * k / (2 * _SIDE)) for n in range(_SIDE)] for k in _FREQUENCIES]


def perceptual_hash(image: Image.Image) -> int:
    """Return the 64-bit DCT perceptual hash of ``image``, as an unsigned integer.

    Give it the image as shown (after its EXIF orientation): a rotated copy is another image.
    A header-sized decode is enough (``Image.draft`` for a JPEG, a thumbnail of ~100 px): only
    32x32 pixels are read.
    """
    image = placeholders.eight_bit(image)
    if image.mode not in ('L', 'RGB'):
        image = placeholders.on_white(image)  # NOTE: transparent pixels count as white, whatever colour they hide
    # PERF: reduce first, then convert: converting a 12 MP image to grey costs more than the hash.
    small = image.resize((_SIDE, _SIDE), Image.Resampling.BOX).convert('L')
    pixels = small.tobytes()
    rows = [pixels[y * _SIDE : (y + 1) * _SIDE] for y in range(_SIDE)]
    # Separable DCT: first along each row (8 frequencies of 32 rows), then down the columns.
    # PERF: sum(map(mul, ...)), not a generator over zip: the same products summed in the same
    # order (the same hash), in C: the hash of a 32x32 image 0.67 -> 0.38 ms CPU.
    along = [[sum(map(mul, basis, row)) for basis in _BASIS] for row in rows]
    columns = list(zip(*along, strict=True))
    # NOTE: rounded, because a flat image's coefficients are all zero but for float noise (1e-13),
    # which made each colour's hash a different arbitrary value; a real pixel's step of 1 moves one
    # by far more than 1e-6, so no other image's hash changes.
    coefficients = [round(sum(map(mul, basis, column)), 6) for basis in _BASIS for column in columns]
    median = sorted(coefficients)[len(coefficients) // 2]
    value = 0
    for coefficient in coefficients:
        value = (value << 1) | (coefficient > median)
    return value


def distance(a: int, b: int) -> int:
    """Return the Hamming distance of two 64-bit hashes (signed or unsigned)."""
    return ((a ^ b) & _MASK).bit_count()


def to_signed(value: int) -> int:
    """Return an unsigned 64-bit hash as the signed integer SQLite and PostgreSQL's BIGINT store."""
    return value - (1 << 64) if value >= 1 << 63 else value


def to_unsigned(value: int) -> int:
    """Return a stored (signed) hash as the unsigned 64-bit integer :func:`perceptual_hash` gives."""
    return value & _MASK


def to_hex(value: int) -> str:
    """Return a hash as the 16 hex digits the meta and the API show."""
    return f'{to_unsigned(value):016x}'


def bands(value: int) -> list[int]:
    """Return the four 16-bit bands of a hash, most significant first."""
    value = to_unsigned(value)
    return [(value >> (_BAND_BITS * (BANDS - 1 - i))) & _BAND_MASK for i in range(BANDS)]


def _within(band: int, radius: int) -> list[int]:
    """Return every 16-bit value within ``radius`` bits of ``band``, itself first."""
    values = [band]
    for flips in range(1, radius + 1):
        for bits in combinations(range(_BAND_BITS), flips):
            mask = 0
            for bit in bits:
                mask |= 1 << bit
            values.append(band ^ mask)
    return values


def schema(dialect: str) -> list[str]:
    """Return the statements that create the table and its band indexes (``sqlite`` or ``postgresql``).

    ``id`` is a small integer key of the row; ``hash`` the whole hash as a signed 64-bit integer
    (SQLite's INTEGER, PostgreSQL's BIGINT); ``b0``..``b3`` its 16-bit bands, most significant
    first, each with an index of its own.
    """
    if dialect not in ('sqlite', 'postgresql'):
        raise ValueError(f'no schema for {dialect!r}')
    if dialect == 'sqlite':
        key, big, band, covered = 'id INTEGER PRIMARY KEY', 'INTEGER', 'INTEGER', '(b{i}, hash)'
    else:
        key, big, band, covered = (
            'id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY',
            'BIGINT',
            'INT',
            '(b{i}) INCLUDE (hash, id)',
        )
    bands_ = ', '.join(f'b{i} {band} NOT NULL' for i in range(BANDS))
    statements = [
        f'CREATE TABLE IF NOT EXISTS image_hashes ({key}, hex TEXT NOT NULL UNIQUE, hash {big} NOT NULL, {bands_})'
    ]
    # PERF: covering indexes: a query reads its candidates' hash and id from the band's index alone,
    # not one lookup into the table for each (at a million rows, d <= 10: ~8,000 candidates), and
    # the id (8 bytes; SQLite's index holds the rowid already) keeps them a third of the size they
    # are with the 64-character hex (PostgreSQL, a million rows: 397 MiB in all, not 644).
    statements += [
        f'CREATE INDEX IF NOT EXISTS image_hashes_b{i} ON image_hashes {covered.format(i=i)}' for i in range(BANDS)
    ]
    return statements


def sync_triggers(dialect: str) -> list[str]:
    """Return the statements of the triggers that keep ``image_hashes`` in step with the index's ``blobs``.

    A row of ``blobs`` is an image's when its ``item`` (the listing entry, JSON: the meta)
    carries ``phash``, 16 hex digits; the triggers write its hash and bands, or remove them, in
    the transaction of the row's own change, as the change feed's triggers do: every writer
    (an upload, a rebuild, a backfill, a delete) is covered and none can forget it.
    NOTE: the hex digits are turned into integers in SQL (SQLite has no hex parser: each digit
    is its place in a string of them); a malformed phash (a meta edited by hand) is left out.
    """
    if dialect == 'sqlite':
        digit = "(instr('0123456789abcdef', substr(p, {at}, 1)) - 1)"
        columns = ', '.join(
            ' + '.join(f'{digit.format(at=4 * i + k + 1)} * {16 ** (3 - k)}' for k in range(4)) + f' AS b{i}'
            for i in range(BANDS)
        )
        whole = ' | '.join(f'(b{i} << {_BAND_BITS * (BANDS - 1 - i)})' for i in range(BANDS))
        body = (
            'DELETE FROM image_hashes WHERE hex = new.hex; '
            f'INSERT INTO image_hashes (hex, hash, b0, b1, b2, b3) SELECT new.hex, {whole}, b0, b1, b2, b3 '
            f"FROM (SELECT {columns} FROM (SELECT json_extract(new.item, '$.phash') AS p) "
            f"WHERE new.collection = 'images' AND p GLOB '{'[0-9a-f]' * 16}');"
        )
        return [
            f'CREATE TRIGGER IF NOT EXISTS image_hashes_insert AFTER INSERT ON blobs BEGIN {body} END',
            f'CREATE TRIGGER IF NOT EXISTS image_hashes_update AFTER UPDATE ON blobs BEGIN {body} END',
            'CREATE TRIGGER IF NOT EXISTS image_hashes_delete AFTER DELETE ON blobs BEGIN '
            'DELETE FROM image_hashes WHERE hex = old.hex; END',
        ]
    if dialect != 'postgresql':
        raise ValueError(f'no triggers for {dialect!r}')
    bands_sql = ', '.join(f"('x' || substr(p, {4 * i + 1}, 4))::bit(16)::int" for i in range(BANDS))
    return [
        f"""CREATE OR REPLACE FUNCTION iss_image_hashes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE p text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM image_hashes WHERE hex = OLD.hex;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.collection = 'images' THEN
        p := NEW.item::json ->> 'phash';
        IF p ~ '^[0-9a-f]{{16}}$' THEN
            INSERT INTO image_hashes (hex, hash, b0, b1, b2, b3)
            VALUES (NEW.hex, ('x' || p)::bit(64)::bigint, {bands_sql})
            ON CONFLICT (hex) DO UPDATE SET hash = excluded.hash,
                b0 = excluded.b0, b1 = excluded.b1, b2 = excluded.b2, b3 = excluded.b3;
        END IF;
    END IF;
    RETURN NULL;
END $$""",
        'CREATE OR REPLACE TRIGGER blobs_image_hashes AFTER INSERT OR UPDATE OR DELETE ON blobs '
        'FOR EACH ROW EXECUTE FUNCTION iss_image_hashes()',
    ]


#: Runs one statement written with ``?`` placeholders and returns its rows: ``index._run`` is one.
Execute = Callable[[str, Iterable[Any]], list[tuple]]
#: Runs one statement for many rows in one transaction: ``index._execute_many`` is one.
ExecuteMany = Callable[[str, list[tuple]], None]


class SimilarIndex:
    """The perceptual hashes of a store's images, found by closeness.

    Args:
        execute: runs one statement (``?`` placeholders) and returns its rows; the
            store's index supplies it (``_Queries._run`` turns ``?`` into ``%s`` for
            PostgreSQL), and :func:`sqlite_execute` / :func:`postgres_execute` wrap a
            bare DB-API connection.
        execute_many: runs one statement for many rows in one transaction (a rebuild).
    """

    def __init__(self, execute: Execute, execute_many: ExecuteMany | None = None) -> None:
        self._execute = execute
        self._execute_many = execute_many

    def put(self, hex_digest: str, value: int) -> None:
        """Store (or replace) the hash of the image ``hex_digest``."""
        self._execute(self._PUT, _row(hex_digest, value))

    def put_many(self, rows: Iterable[tuple[str, int]]) -> None:
        """Store many hashes in one transaction (a rebuild, a benchmark's load)."""
        batch = [_row(hex_digest, value) for hex_digest, value in rows]
        if self._execute_many is None:
            for row in batch:
                self._execute(self._PUT, row)
        else:
            self._execute_many(self._PUT, batch)

    def remove(self, hex_digest: str) -> None:
        """Forget the hash of a deleted image."""
        self._execute('DELETE FROM image_hashes WHERE hex = ?', (hex_digest,))

    def get(self, hex_digest: str) -> int | None:
        """Return the stored hash of ``hex_digest`` (unsigned), or None."""
        rows = self._execute('SELECT hash FROM image_hashes WHERE hex = ?', (hex_digest,))
        return to_unsigned(rows[0][0]) if rows else None

    def near(
        self,
        value: int,
        max_distance: int = DEFAULT_DISTANCE,
        limit: int = 20,
        *,
        exclude: str | None = None,
        after: tuple[int, str] | None = None,
    ) -> list[tuple[str, int]]:
        """Return up to ``limit`` images within ``max_distance`` bits of ``value``: ``(hex, distance)``, nearest first.

        Exact: every stored hash within the distance is a candidate (see the module's docstring).
        Ties are in the order of ``hex``. ``exclude`` leaves out one image (the one asked about);
        ``after`` is the ``(distance, hex)`` of the last one of the page before (the next page's start).
        """
        if not 0 <= max_distance <= MAX_DISTANCE:
            raise ValueError(f'max_distance must be between 0 and {MAX_DISTANCE}')
        radius = max_distance // BANDS
        looked_up = [_within(band, radius) for band in bands(value)]
        # NOTE: one SELECT per band, not one WHERE of ORs: given a few hundred values SQLite's
        # planner gives up the OR of four indexes and scans the table.
        sql = ' UNION ALL '.join(
            f'SELECT id, hash FROM image_hashes WHERE b{i} IN ({", ".join("?" * len(values))})'
            for i, values in enumerate(looked_up)
        )
        near = {}  # NOTE: a dict, as an image near in two bands comes back twice
        for key, stored in self._execute(sql, [v for values in looked_up for v in values]):
            d = ((value ^ stored) & _MASK).bit_count()
            if d <= max_distance:
                near[key] = d
        # Then the hex of those within the distance only, by primary key.
        found = []
        keys = list(near)
        for start in range(0, len(keys), self._KEYS_PER_SELECT):
            chunk = keys[start : start + self._KEYS_PER_SELECT]
            rows = self._execute(f'SELECT id, hex FROM image_hashes WHERE id IN ({", ".join("?" * len(chunk))})', chunk)
            found += [(near[key], hex_digest) for key, hex_digest in rows if hex_digest != exclude]
        if after is not None:
            found = [match for match in found if match > after]
        found.sort()
        return [(hex_digest, d) for d, hex_digest in found[:limit]]

    _KEYS_PER_SELECT = 1000
    _PUT = (
        f'INSERT INTO image_hashes (hex, hash, {", ".join(f"b{i}" for i in range(BANDS))}) '
        f'VALUES (?, ?, {", ".join("?" * BANDS)}) ON CONFLICT (hex) DO UPDATE SET '
        f'hash = excluded.hash, {", ".join(f"b{i} = excluded.b{i}" for i in range(BANDS))}'
    )


def _row(hex_digest: str, value: int) -> tuple:
    return (hex_digest, to_signed(value), *bands(value))


def sqlite_execute(connection: Any) -> Execute:
    """Return an ``execute`` for a bare :mod:`sqlite3` connection (autocommit)."""

    def execute(sql: str, params: Iterable[Any]) -> list[tuple]:
        return connection.execute(sql, tuple(params)).fetchall()

    return execute


def postgres_execute(connection: Any) -> Execute:
    """Return an ``execute`` for a bare psycopg connection (autocommit): ``?`` becomes ``%s``."""

    def execute(sql: str, params: Iterable[Any]) -> list[tuple]:
        cursor = connection.execute(sql.replace('?', '%s'), tuple(params))
        return cursor.fetchall() if cursor.description else []

    return execute
