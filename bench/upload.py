"""Large uploads against their limit, alternated: the limit measured right before each upload.

    python -m bench.upload --url http://127.0.0.1:8000 [--mib 512] [--rounds 3] [--server-pid PID]

The limit is what storing the bytes costs at least: hashlib sha256 of the file, then
`cp && sync` of it. Each round changes the file's first bytes (so every upload is new content,
never the cheaper duplicate path), measures the limit, uploads with `curl -T` (raw PUT to
/artifacts/{id}), changes the bytes again, measures the limit, and uploads with `curl -F`
(multipart POST /artifacts). Each upload's ratio is to the limit measured just before it, so
a machine that is slower for a minute slows both sides of a ratio alike; the medians of the
rounds are printed, with the server tree's largest RSS growth during an upload.
"""

import argparse
import hashlib
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import iss_bench

MB = 1_000_000


def rss_mib(roots: list[int]) -> float:
    """The RSS of these processes and all their descendants, read now."""
    return sum(info['rss_kb'] for info in iss_bench.snapshot(roots).values()) / 1024


def make_new(source: pathlib.Path, tag: str) -> None:
    """Give the file new content of the same size: its first bytes name the round."""
    with open(source, 'r+b') as file:
        file.write(tag.encode().ljust(64, b'.'))


def limit_mb_s(source: pathlib.Path, work: pathlib.Path) -> tuple[float, str]:
    """hashlib sha256 + cp && sync of ``source``: (MB/s, hex digest)."""
    size = source.stat().st_size
    copy = work / 'copy.bin'
    started = time.perf_counter()
    sha256 = hashlib.sha256()
    with open(source, 'rb') as file:
        while chunk := file.read(1024 * 1024):
            sha256.update(chunk)
    shutil.copyfile(source, copy)
    subprocess.run(['sync', str(copy)], check=True)
    elapsed = time.perf_counter() - started
    copy.unlink()
    return size / elapsed / MB, sha256.hexdigest()


def upload_mb_s(command: list[str], size: int, roots: list[int]) -> tuple[float, float]:
    """Run curl; (MB/s, server RSS growth in MiB). Fails unless the answer is 200 or 201."""
    before = rss_mib(roots) if roots else 0.0
    started = time.perf_counter()
    status = subprocess.run(
        ['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', *command], check=True, capture_output=True, text=True
    ).stdout
    elapsed = time.perf_counter() - started
    if status not in ('200', '201'):
        sys.exit(f'upload failed: HTTP {status} from {command[-1]}')
    return size / elapsed / MB, (rss_mib(roots) - before if roots else float('nan'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', required=True)
    parser.add_argument('--mib', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--server-pid', type=int, help='to report the RSS growth of its process tree')
    args = parser.parse_args()
    roots = [args.server_pid] if args.server_pid else []
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-upload-'))
    results: dict[str, list[tuple[float, float, float]]] = {'PUT': [], 'multipart': []}
    try:
        source = work / 'upload.bin'
        with open(source, 'wb') as out:
            for _ in range(args.mib):
                out.write(os.urandom(1024 * 1024))
        size = source.stat().st_size
        nonce = os.urandom(4).hex()
        for round_number in range(args.rounds):
            make_new(source, f'{nonce} PUT {round_number}')
            limit, hex_digest = limit_mb_s(source, work)
            put = f'{args.url}/artifacts/sha256:{hex_digest}?kind=bench'
            results['PUT'].append((*upload_mb_s(['-T', str(source), put], size, roots), limit))
            make_new(source, f'{nonce} multipart {round_number}')
            limit, _ = limit_mb_s(source, work)
            form = ['-F', f'file=@{source};type=application/octet-stream', f'{args.url}/artifacts?kind=bench']
            results['multipart'].append((*upload_mb_s(form, size, roots), limit))
    finally:
        shutil.rmtree(work)
    for method, rounds in results.items():
        ratios = [upload / limit for upload, _, limit in rounds]
        print(
            f'{method} {args.mib} MiB, median of {len(rounds)}: '
            f'{statistics.median(upload for upload, _, _ in rounds):,.0f} MB/s; '
            f'limit hashlib + cp&&sync {statistics.median(limit for _, _, limit in rounds):,.0f} MB/s; '
            f'ratio {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}); '
            f'server RSS growth at most {max(growth for _, growth, _ in rounds):.1f} MiB'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
