"""Time near-duplicate queries of iss_server.similar at a million hashes, in SQLite and in PostgreSQL.

    .venv/bin/python -m bench.similar_index [--rows 1000000] [--queries 200] [--no-postgres] [--no-sqlite]
        [--shared-buffers 512MB]

Loads random 64-bit hashes plus, for each query, neighbours planted at known
distances; then times ``SimilarIndex.near`` for several radii and reports
p50/p99 and the candidates read. A few queries are checked against a full scan
(the index must be exact). PostgreSQL is Debian's, started by iss_testing.servers.PostgreSQL.
NOTE: random hashes spread evenly over the bands; real pHashes cluster, so real
band buckets are fuller (see NOTES-similar.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sqlite3
import statistics
import tempfile
import time

from iss_server import similar

RADII = (3, 7, 8, 10, 12)


def make_hashes(rows: int, queries: int, seed: int = 27) -> tuple[list[tuple[str, int]], list[int]]:
    """Return the rows to load (random, then 8 planted around each query, 0 to 16 bits away) and the queries."""
    rng = random.Random(seed)
    data = [(f'{i:064x}', rng.getrandbits(64)) for i in range(rows)]
    targets = []
    for q in range(queries):
        base = rng.getrandbits(64)
        targets.append(base)
        for k, d in enumerate((0, 1, 3, 5, 7, 10, 12, 16)):
            flipped = base
            for bit in rng.sample(range(64), d):
                flipped ^= 1 << bit
            data.append((f'{rows + q * 8 + k:064x}', flipped))
    return data, targets


def time_queries(index: similar.SimilarIndex, targets: list[int], radius: int) -> tuple[list[float], list[int]]:
    times, found = [], []
    for target in targets:
        start = time.perf_counter()
        answer = index.near(target, radius, limit=50)
        times.append((time.perf_counter() - start) * 1000)
        found.append(len(answer))
    return times, found


def report(name: str, index: similar.SimilarIndex, targets: list[int], data: list[tuple[str, int]]) -> None:
    index.near(targets[0], 3)  # NOTE: warm the cache
    for radius in RADII:
        some = targets if radius <= 12 else targets[: max(20, len(targets) // 5)]
        times, found = time_queries(index, some, radius)
        times.sort()
        p90, p99 = (times[min(len(times) - 1, int(len(times) * q))] for q in (0.9, 0.99))
        over = sum(t > 50 for t in times)
        print(
            f'{name:10} d<={radius:2} queries={len(some):4} p50={statistics.median(times):7.2f} ms '
            f'p90={p90:7.2f} ms p99={p99:7.2f} ms max={times[-1]:7.2f} ms over 50 ms: {over:3} '
            f'found(mean)={statistics.mean(found):.1f}',
            flush=True,
        )
    # Exactness: a full scan finds nothing the index missed.
    for target in targets[:3]:
        scan = sorted((similar.distance(target, v), h) for h, v in data if similar.distance(target, v) <= 12)
        assert [(h, d) for d, h in scan][:50] == index.near(target, 12, limit=50), 'the index missed a neighbour'
    print(f'{name:10} exact against a full scan (3 queries, d<=12)', flush=True)


def sqlite_run(data: list[tuple[str, int]], targets: list[int]) -> None:
    directory = tempfile.mkdtemp(prefix='iss-similar-')
    db = sqlite3.connect(os.path.join(directory, 'index.sqlite3'), isolation_level=None)
    db.execute('PRAGMA journal_mode=WAL')
    db.execute('PRAGMA synchronous=NORMAL')
    statements = similar.schema('sqlite')
    start = time.perf_counter()
    db.execute(statements[0])
    db.execute('BEGIN')
    db.executemany(similar.SimilarIndex._PUT, [similar._row(h, v) for h, v in data])
    db.execute('COMMIT')
    for statement in statements[1:]:
        db.execute(statement)
    db.execute('ANALYZE')
    db.execute('PRAGMA wal_checkpoint(TRUNCATE)')  # NOTE: the load's writes flushed now, not during the queries
    size = os.path.getsize(os.path.join(directory, 'index.sqlite3'))
    elapsed = time.perf_counter() - start
    print(f'sqlite     loaded {len(data)} rows in {elapsed:.1f} s, {size / 2**20:.0f} MiB', flush=True)
    try:
        report('sqlite', similar.SimilarIndex(similar.sqlite_execute(db)), targets, data)
    finally:
        db.close()
        shutil.rmtree(directory)


def postgres_run(data: list[tuple[str, int]], targets: list[int], shared_buffers: str | None) -> None:
    import psycopg

    from iss_testing.servers import PostgreSQL  # NOTE: the test suite's harness: initdb + pg_ctl as postgres

    server = PostgreSQL()
    try:
        if shared_buffers:
            # NOTE: the harness starts with the default 128 MB; a server for a million images would have more.
            with psycopg.connect(server.url(), autocommit=True) as db:
                db.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
            # NOTE: with its log file, or the new postmaster holds pg_ctl's captured output open.
            log = str(server.directory / 'postgres.log')
            server._run(str(server._bin / 'pg_ctl'), '-D', str(server._data), '-l', log, '-w', 'restart')
        with psycopg.connect(server.url(), autocommit=True) as db:
            statements = similar.schema('postgresql')
            start = time.perf_counter()
            db.execute(statements[0])
            with db.cursor() as cursor, cursor.copy('COPY image_hashes (hex, hash, b0, b1, b2, b3) FROM STDIN') as copy:
                for h, v in data:
                    copy.write_row(similar._row(h, v))
            for statement in statements[1:]:
                db.execute(statement)
            db.execute('VACUUM ANALYZE image_hashes')
            db.execute('CHECKPOINT')  # NOTE: the load's writes flushed now, not during the queries
            size = db.execute("SELECT pg_total_relation_size('image_hashes')").fetchone()[0]
            print(
                f'postgresql loaded {len(data)} rows in {time.perf_counter() - start:.1f} s, {size / 2**20:.0f} MiB',
                flush=True,
            )
            report('postgresql', similar.SimilarIndex(similar.postgres_execute(db)), targets, data)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', type=int, default=1_000_000)
    parser.add_argument('--queries', type=int, default=200)
    parser.add_argument('--no-postgres', action='store_true')
    parser.add_argument('--no-sqlite', action='store_true')
    parser.add_argument('--shared-buffers', help="PostgreSQL's shared_buffers, e.g. 512MB (default: the harness's)")
    args = parser.parse_args()
    print(
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} {platform.node()} {platform.processor()} '
        f'{os.cpu_count()} cores, python {platform.python_version()}, sqlite {sqlite3.sqlite_version}',
        flush=True,
    )
    data, targets = make_hashes(args.rows, args.queries)
    if not args.no_sqlite:
        sqlite_run(data, targets)
    if not args.no_postgres:
        postgres_run(data, targets, args.shared_buffers)


if __name__ == '__main__':
    main()
