"""Raw PUT upload throughput against its limit, in one run (iss_bench.py measures multipart only).

    python3 bench/put_upload.py --url http://127.0.0.1:8000 [--mib 512] [--server-pid PID]

Writes fresh random bytes to a file, then times, on the same file: hashlib sha256 + cp&&sync
(the limit: what storing those bytes costs at least), and `curl -T` to PUT /artifacts/{id}.
Prints MB/s for both, their ratio, and the RSS growth of the server's process tree.
"""

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

MB = 1_000_000


def tree(pid: int) -> list[int]:
    children = pathlib.Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    return [pid, *(p for child in children for p in tree(int(child)))]


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in pathlib.Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                total += int(line.split()[1])
    return total / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', required=True)
    parser.add_argument('--mib', type=int, default=512)
    parser.add_argument('--server-pid', type=int, help='to report the RSS growth of its process tree')
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-put-'))
    try:
        source = work / 'upload.bin'
        with open(source, 'wb') as out:
            for _ in range(args.mib):
                out.write(os.urandom(1024 * 1024))
        size = source.stat().st_size

        started = time.perf_counter()
        sha256 = hashlib.sha256()
        with open(source, 'rb') as file:
            while chunk := file.read(1024 * 1024):
                sha256.update(chunk)
        shutil.copyfile(source, work / 'copy.bin')
        subprocess.run(['sync', str(work / 'copy.bin')], check=True)
        limit = size / (time.perf_counter() - started) / MB

        pids = tree(args.server_pid) if args.server_pid else []
        before = rss_mib(pids) if pids else 0.0
        url = f'{args.url}/artifacts/sha256:{sha256.hexdigest()}?kind=bench'
        started = time.perf_counter()
        status = subprocess.run(
            ['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', '-T', str(source), url],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        upload = size / (time.perf_counter() - started) / MB
        growth = rss_mib(pids) - before if pids else float('nan')
    finally:
        shutil.rmtree(work)
    print(
        f'PUT {args.mib} MiB: HTTP {status}, {upload:,.0f} MB/s; limit hashlib + cp&&sync {limit:,.0f} MB/s; '
        f'ratio {upload / limit:.2f}x; server RSS growth {growth:.1f} MiB'
    )
    return 0 if status in ('200', '201') else 1


if __name__ == '__main__':
    sys.exit(main())
