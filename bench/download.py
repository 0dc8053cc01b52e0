"""Large downloads from ISS against nginx sending the very same stored file, alternated in one run.

    python -m bench.download --url http://127.0.0.1:8800 --data-dir DATA [--mib 512] [--rounds 5]

iss_bench.py times one ISS download right after the upload against the median of three nginx
downloads of another copy; here both servers send the same blob file (nginx, configured as in
iss_bench.py, from the blob directory), taking turns, each a median of ``--rounds`` downloads
with curl to /dev/null. Prints MB/s for both and their ratio. Needs curl and nginx.
"""

import hashlib
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench import alternate

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
    parser = alternate.arguments(__doc__.splitlines()[0])
    parser.add_argument('--mib', type=int, default=512)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='iss-download-'))
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
    finally:
        shutil.rmtree(work)
    with alternate.nginx_on_blobs(args.data_dir) as nginx_url:
        targets = {'ISS': f'{args.url}/artifacts/sha256:{hex_digest}', 'nginx': nginx_url(hex_digest)}
        # NOTE: the warm-up downloads start both from the page cache.
        times = alternate.take_turns(targets, lambda url: download_seconds(url, size), args.rounds)
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
