"""``GET /images/{id}/similar`` and ``POST /images/similar`` at a million images, on SQLite and PostgreSQL.

    .venv/bin/python -m bench.images_similar [--rows 1000000] [--queries 40] [--no-postgres] [--no-sqlite]

End to end through the app (``iss.build_app``, called in-process by WebTest: routing, the
meta read, the index's two queries, the JSON answer; no network): a file store whose index
holds ``--rows`` image rows, each with a random 64-bit ``phash`` in its item, written into
``blobs`` (SQLite: the index's own ``put_missing``; PostgreSQL: COPY) so that the index's
triggers fill ``image_hashes`` as an upload's do; plus
``--queries`` real pictures uploaded through ``POST /images``, each with 8 rows planted 1 to 12
bits from its hash. Then, for each picture: ``GET /images/{id}/similar`` (default distance 10,
limit 20) and ``POST /images/similar`` with the picture (its decode and hash included);
p50/p90/p99 in ms. bench/similar_index.py times the bare index query (``similar.SimilarIndex``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time

import webtest

import iss
from bench.near_duplicates import picture
from iss_server import index, similar
from iss_server.config import Settings

PLANTED = (1, 2, 3, 5, 7, 9, 10, 12)
BATCH = 50_000


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    picture(seed).save(buffer, 'PNG')
    return buffer.getvalue()


def percentiles(times: list[float]) -> str:
    times = sorted(times)
    p90, p99 = (times[min(len(times) - 1, int(len(times) * q))] for q in (0.9, 0.99))
    return f'p50={statistics.median(times):6.1f} ms p90={p90:6.1f} ms p99={p99:6.1f} ms max={times[-1]:6.1f} ms'


def run(name: str, settings: Settings, rows: int, queries: int) -> None:
    client = webtest.TestApp(iss.build_app(settings))
    pictures = {}
    for seed in range(1000, 1000 + queries):
        data = png(seed)
        answer = client.post('/images', data, content_type='image/png').json
        pictures[answer['image_id']] = (data, int(answer['phash'], 16))
    the_index = index.open_index(settings.index, settings.data_dir)
    rng = random.Random(27)
    planted = [
        value ^ sum(1 << bit for bit in rng.sample(range(64), d)) for _, value in pictures.values() for d in PLANTED
    ]
    values = [rng.getrandbits(64) for _ in range(rows - len(planted))] + planted
    start = time.perf_counter()
    rows_of = (
        index.row_for(
            f'{number:064x}', {'kind': 'image', 'bytes': 1, 'phash': similar.to_hex(value), 'created_at': 1.0}, 1.0, 1
        )
        for number, value in enumerate(values)
    )
    if isinstance(the_index, index.PostgresIndex):
        # PERF: COPY, with the totals' and the change feed's triggers off for the load (not what is
        # measured: ~15 min with them); image_hashes' trigger fires for each row, as for an upload.
        db = the_index._connection()
        db.execute('SET statement_timeout = 0')  # NOTE: the index's 15 s is for requests, not a load
        others = ('blobs_totals', 'blobs_events')
        for trigger in others:
            db.execute(f'ALTER TABLE blobs DISABLE TRIGGER {trigger}')
        with db.cursor() as cursor, cursor.copy('COPY blobs FROM STDIN') as copy:
            for row in rows_of:
                copy.write_row(dataclasses.astuple(row))
        for trigger in others:
            db.execute(f'ALTER TABLE blobs ENABLE TRIGGER {trigger}')
    else:
        batch = []
        for row in rows_of:
            batch.append(row)
            if len(batch) == BATCH:
                the_index.put_missing(batch)
                batch = []
        the_index.put_missing(batch)
    loaded = time.perf_counter() - start
    the_index._run('ANALYZE')  # NOTE: what the planner knows after autovacuum, at once
    if isinstance(the_index, index.PostgresIndex):
        the_index._run('VACUUM image_hashes')  # NOTE: the visibility map, so the band scans are index-only
        the_index._run('RESET statement_timeout')
    else:
        the_index._run('PRAGMA wal_checkpoint(TRUNCATE)')  # NOTE: the load's writes flushed now, not during the queries
    count = the_index._run('SELECT count(*) FROM image_hashes')[0][0]
    print(f'{name:10} loaded {rows:,} rows (image_hashes by the triggers: {count:,}) in {loaded:.0f} s', flush=True)

    ids = list(pictures)
    client.get(f'/images/{ids[0]}/similar')  # NOTE: warm
    gets, posts, bare, found = [], [], [], []
    for image_id in ids:
        started = time.perf_counter()
        the_index.similar_images(pictures[image_id][1], 10, 20, exclude=image_id[7:])
        bare.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        answer = client.get(f'/images/{image_id}/similar').json
        gets.append((time.perf_counter() - started) * 1000)
        found.append(len(answer['items']))
        started = time.perf_counter()
        client.post('/images/similar', pictures[image_id][0], content_type='image/png')
        posts.append((time.perf_counter() - started) * 1000)
    print(f'{name:10} the index alone d<=10:            {percentiles(bare)}', flush=True)
    print(f'{name:10} GET  /images/{{id}}/similar d<=10: {percentiles(gets)}', flush=True)
    print(f'{name:10} POST /images/similar d<=10:      {percentiles(posts)}', flush=True)
    print(f'{name:10} found per query: mean {statistics.mean(found):.1f} (planted within 10: 7)', flush=True)
    # Exactness: what the route answers is what a scan of the table finds.
    for image_id in ids[:3]:
        value = pictures[image_id][1]
        scan = sorted(
            (similar.distance(value, stored), hex_digest)
            for hex_digest, stored in the_index._run('SELECT hex, hash FROM image_hashes')
            if similar.distance(value, stored) <= 10 and hex_digest != image_id[7:]
        )
        answer = client.get(f'/images/{image_id}/similar?limit=100').json
        assert [(item['distance'], item['id'][7:]) for item in answer['items']] == scan[:100]
    print(f'{name:10} exact against a full scan (3 queries)', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rows', type=int, default=1_000_000)
    parser.add_argument('--queries', type=int, default=40)
    parser.add_argument('--no-sqlite', action='store_true')
    parser.add_argument('--no-postgres', action='store_true')
    args = parser.parse_args()
    now = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    print(f'{platform.node()} {os.cpu_count()} cores, {platform.platform()}, {now}')
    if not args.no_sqlite:
        directory = tempfile.mkdtemp(prefix='iss-images-similar-')
        try:
            run('sqlite', Settings(data_dir=os.path.join(directory, 'data')), args.rows, args.queries)
        finally:
            shutil.rmtree(directory)
    if not args.no_postgres:
        from iss_testing.servers import PostgreSQL

        server = PostgreSQL()
        directory = tempfile.mkdtemp(prefix='iss-images-similar-')
        try:
            settings = Settings(data_dir=os.path.join(directory, 'data'), index=server.new_database())
            run('postgresql', settings, args.rows, args.queries)
        finally:
            server.stop()
            shutil.rmtree(directory)
    print(json.dumps({'rows': args.rows, 'queries': args.queries}))


if __name__ == '__main__':
    main()
