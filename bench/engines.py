"""The cost of the engines' guards (issue 24): pooled PostgreSQL connections, deadlines, bulkheads.

    python -m bench.engines OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--seconds 5]

For each checkout, one ``gunicorn iss:app`` with the default settings (2 workers x 16 threads) on
an S3 store (a prefix of one bucket of a real SeaweedFS, its index a schema of a real PostgreSQL:
``iss_testing.servers``), where every request below asks the index. Then, round after round, the
checkouts taking turns (old, new, new, old...), wrk (1 thread, 16 connections) measures:

- ``GET 4 KiB``: a stored 4 KiB PNG, served from the node's copy once its index row is read;
- ``GET /stats``: one small read of the index and nothing else;
- ``POST 4 KiB distinct``: one new 4 KiB PNG per multipart ``POST /images`` (bench.small_post's
  script): the bucket's PUTs and the index's writes.

Prints each figure's median per side and the ratio new/old of the medians with the range of the
rounds' ratios: on a shared machine only a ratio taken in the same minute means much. Needs wrk.
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import urllib.request

from bench import alternate, iss_bench, small_get, small_post
from bench.house import start_node
from iss_testing.servers import PostgreSQL, SeaweedFS, s3_node_environment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('old')
    parser.add_argument('new')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--seconds', type=float, default=5)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-engines-'))
    seaweedfs = SeaweedFS(work / 'seaweedfs')
    postgres = PostgreSQL()
    processes = []
    try:
        nodes: dict[str, str] = {}
        for side, checkout in (('old', args.old), ('new', args.new)):
            process, nodes[side] = start_node(checkout, work, side, s3_node_environment(seaweedfs, postgres))
            processes.append(process)
        head, text, tail = iss_bench.make_png_parts()
        script = small_post.write_script(str(work), 1)
        images = {}
        for side, url in nodes.items():
            upload = urllib.request.Request(
                url + '/images', data=head + text + tail, headers={'Content-Type': 'image/png'}, method='POST'
            )
            with urllib.request.urlopen(upload) as answer:
                images[side] = iss_bench.extract_id(answer.read())
        measures = {
            'GET 4 KiB, req/s': lambda side: small_get.wrk(f'{nodes[side]}/images/{images[side]}', args.seconds),
            'GET /stats, req/s': lambda side: small_get.wrk(f'{nodes[side]}/stats', args.seconds),
            'POST 4 KiB distinct, req/s': lambda side: small_post.wrk(nodes[side] + '/images', script, args.seconds),
        }
        results = alternate.alternating_rounds(
            args.rounds,
            dict.fromkeys(measures, ('old', 'new')),
            lambda name, side: float(measures[name](side)['rps']),
            show=lambda value: f'{value:,.1f}',
        )
        print()
        for name, sides in results.items():
            old, new = statistics.median(sides['old']), statistics.median(sides['new'])
            ratios = [n / o for n, o in zip(sides['new'], sides['old'], strict=True)]
            print(
                f'{name}: old {old:,.1f}, new {new:,.1f}; new/old {new / old:.3f} '
                f'({min(ratios):.3f}-{max(ratios):.3f} over {args.rounds} rounds)'
            )
    finally:
        for process in processes:
            os.killpg(process.pid, 15)
        for process in processes:
            process.wait(20)
        seaweedfs.stop()
        postgres.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
