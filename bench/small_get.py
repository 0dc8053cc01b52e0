"""Small GETs from ISS against nginx sending the very same blob file, alternated in one run.

    python -m bench.small_get --url http://127.0.0.1:8800 --data-dir DATA [--rounds 5] [--seconds 5] [--site]

iss_bench.py measures ISS's small GETs and, a minute or two later, nginx's; on a shared
machine whose speed changes by the minute that ratio moves with it. Here a 4096-byte PNG
(iss_bench.py's) is stored in ISS, and wrk (1 thread, 16 connections, as iss_bench.py) asks
ISS for it and nginx (configured as in iss_bench.py) for its blob file, taking turns for
``--rounds`` rounds. Prints the median req/s of each, the ratio of the medians with the range
of the rounds' ratios, ISS's median p99, and the ratio as a multiple of the FastAPI version's
(350 req/s against nginx's 65,000 on this kind of machine). With ``--site``, a third side: the
same GET through the shipped nginx site (deploy/nginx/iss.conf.template, started as the tests
start it) in front of that ISS, which answers it from its cache after the first. Needs wrk and nginx.
"""

import contextlib
import pathlib
import statistics
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

from bench import alternate, iss_bench
from iss_testing.servers import Nginx

SEED_RATIO = 350 / 65_000  # the FastAPI version's small GETs against nginx static (issue 6)


def wrk(url: str, seconds: float) -> dict:
    done = subprocess.run(
        ['wrk', '-t1', '-c16', f'-d{seconds:g}s', '--latency', url], check=True, capture_output=True, text=True
    )
    result = iss_bench.parse_wrk(done.stdout)
    if 'rps' not in result or result['non_2xx_3xx'] or result['socket_errors']:
        sys.exit(f'{url}: failed requests\n{done.stdout}{done.stderr}')
    return result


def main() -> int:
    parser = alternate.arguments(__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=5)
    parser.add_argument('--site', action='store_true', help='also through the shipped nginx site in front of ISS')
    args = parser.parse_args()
    head, text, tail = iss_bench.make_png_parts()
    upload = urllib.request.Request(
        f'{args.url}/images', data=head + text + tail, headers={'Content-Type': 'image/png'}, method='POST'
    )
    with urllib.request.urlopen(upload) as answer:
        image_id = iss_bench.extract_id(answer.read())
    with contextlib.ExitStack() as stack:
        nginx_url = stack.enter_context(alternate.nginx_on_blobs(args.data_dir))
        targets = {'ISS': f'{args.url}/images/{image_id}', 'nginx': nginx_url(image_id.removeprefix('sha256:'))}
        if args.site:
            work = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='iss-site-')))
            work.chmod(0o755)  # NOTE: its cache directory is made beside the data, by nginx's workers
            port = urllib.parse.urlsplit(args.url).port
            assert port, '--url needs its port'
            site = Nginx(work, port, pathlib.Path(args.data_dir).resolve())
            stack.callback(site.stop)
            targets['site'] = f'http://127.0.0.1:{site.port}/images/{image_id}'
        rounds = alternate.take_turns(targets, lambda url: wrk(url, args.seconds), args.rounds)
    iss = statistics.median(result['rps'] for result in rounds['ISS'])
    limit = statistics.median(result['rps'] for result in rounds['nginx'])
    ratios = [a['rps'] / b['rps'] for a, b in zip(rounds['ISS'], rounds['nginx'], strict=True)]
    p99 = statistics.median(result['lat_p99_ms'] for result in rounds['ISS'])
    print(
        f'small GET 4 KiB, median of {args.rounds} alternated: ISS {iss:,.0f} req/s (p99 {p99:.2f} ms), '
        f'nginx {limit:,.0f} req/s; ratio {iss / limit:.3f}x ({min(ratios):.3f}-{max(ratios):.3f}), '
        f"{iss / limit / SEED_RATIO:.1f}x the FastAPI version's"
    )
    if 'site' in rounds:
        site = statistics.median(result['rps'] for result in rounds['site'])
        ratios = [a['rps'] / b['rps'] for a, b in zip(rounds['site'], rounds['nginx'], strict=True)]
        print(
            f'through the nginx site: {site:,.0f} req/s '
            f'(p99 {statistics.median(result["lat_p99_ms"] for result in rounds["site"]):.2f} ms); '
            f'{site / limit:.3f}x nginx static ({min(ratios):.3f}-{max(ratios):.3f})'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
