"""Large downloads from ISS against nginx sending the very same stored file, alternated in one run.

    python3 bench/download.py --url http://127.0.0.1:8800 --data-dir DATA [--mib 512] [--rounds 5]

iss_bench.py times one ISS download right after the upload against the median of three nginx
downloads of another copy; here both servers send the same blob file (nginx from the blob
directory, with sendfile), taking turns, each a median of ``--rounds`` downloads with curl to
/dev/null. Prints MB/s for both and their ratio. Needs curl and nginx.
"""

import argparse
import hashlib
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MB = 1_000_000

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


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

        port = free_port()
        (work / 'nginx.conf').write_text(
            NGINX_CONF.format(prefix=work, port=port, root=os.path.abspath(os.path.join(args.data_dir, 'blobs')))
        )
        nginx = subprocess.Popen(['nginx', '-p', str(work), '-c', str(work / 'nginx.conf')], start_new_session=True)
        time.sleep(0.5)
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
