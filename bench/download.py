"""Large downloads from ISS against nginx sending the very same stored file, alternated in one run.

    python3 bench/download.py --url http://127.0.0.1:8800 --data-dir DATA [--mib 512] [--rounds 5]

iss_bench.py times one ISS download right after the upload against the median of three nginx
downloads of another copy; here both servers send the same blob file (nginx, configured as in
iss_bench.py, from the blob directory), taking turns, each a median of ``--rounds`` downloads
with curl to /dev/null. Prints MB/s for both and their ratio. Needs curl and nginx.
"""

import argparse
import hashlib
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import types

import iss_bench

MB = 1_000_000


def download_seconds(url: str, size: int) -> float:
    done = subprocess.run(
        ['curl', '-s', '-o', '/dev/null', '-w', '%{http_code} %{size_download} %{time_total}', url],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    status, received, seconds = done.stdout.split()
    if status != '200' or int(received) != size:
        sys.exit(f'{url}: HTTP {status}, {received} of {size} bytes')
    return float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--url', required=True, help='ISS, e.g. http://127.0.0.1:8800')
    parser.add_argument('--data-dir', required=True, help="that ISS's ISS_DATA")
    parser.add_argument('--mib', type=int, default=512)
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-download-'))
    nginx = None
    try:
        source = work / 'blob.bin'
        sha256 = hashlib.sha256()
        with open(source, 'wb') as out:
            for _ in range(args.mib):
                chunk = os.urandom(1024 * 1024)
                sha256.update(chunk)
                out.write(chunk)
        hex_digest = sha256.hexdigest()
        size = source.stat().st_size
        upload_url = f'{args.url}/artifacts/sha256:{hex_digest}?kind=bench'
        subprocess.run(['curl', '-sf', '-o', '/dev/null', '-T', str(source), upload_url], check=True)
        source.unlink()

        # NOTE: the shared benchmark's own nginx, so the limit is configured as it is there.
        nginx, port = iss_bench.start_nginx(
            types.SimpleNamespace(workdir=str(work), nginx_port=0, nginx_workers='1'),
            os.path.abspath(os.path.join(args.data_dir, 'blobs')),
        )
        targets = {
            'ISS': f'{args.url}/artifacts/sha256:{hex_digest}',
            'nginx': f'http://127.0.0.1:{port}/{hex_digest[:2]}/{hex_digest[2:4]}/{hex_digest}',
        }
        for url in targets.values():  # NOTE: one warm-up each, so both start from the page cache
            download_seconds(url, size)
        times: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, url in targets.items():
                times[name].append(download_seconds(url, size))
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(10)
        shutil.rmtree(work)
    rates = {name: size / statistics.median(seconds) / MB for name, seconds in times.items()}
    spread = {name: f'{size / max(s) / MB:,.0f}-{size / min(s) / MB:,.0f}' for name, s in times.items()}
    print(
        f'GET {args.mib} MiB, median of {args.rounds} alternated: ISS {rates["ISS"]:,.0f} MB/s '
        f'({spread["ISS"]}), nginx {rates["nginx"]:,.0f} MB/s ({spread["nginx"]}); '
        f'ratio {rates["ISS"] / rates["nginx"]:.2f}x'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
