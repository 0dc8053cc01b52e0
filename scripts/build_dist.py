"""Build dist.tar.gz: the service's files for one release, byte-for-byte reproducible.

    python scripts/build_dist.py --version 1.2.3 [--openapi-json openapi.json] [--output dist.tar.gz]

The debug bundle of a release: the code and configuration the image was built from, so an
operator can read exactly what runs. Entries are sorted, owned by 0:0 and dated from
SOURCE_DATE_EPOCH (default 0), so two builds of one commit are identical.
"""

import argparse
import gzip
import io
import os
import pathlib
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = (
    'CHANGELOG.md',
    'Dockerfile',
    'README.md',
    'browse/browse.css',
    'browse/browse.js',
    'browse/favicon.svg',
    'browse/index.html',
    'compose.cluster.yaml',
    'compose.nginx.yaml',
    'compose.service.yaml',
    'deploy/nginx/iss.conf.template',
    'example.env',
    'gunicorn.conf.py',
    'healthcheck.py',
    'iss.py',
    'openapi.yaml',
    'pyproject.toml',
    'requirements.txt',
    'storage.py',
)
# NOTE: every module of the server's package and of the client's, whatever they hold today.
FILES += tuple(
    sorted(
        str(path.relative_to(ROOT))
        for package in ('iss_server', 'iss_client')
        for path in (ROOT / package).rglob('*.py')
    )
)


def build(version: str, output: pathlib.Path, extra: dict[str, bytes], mtime: int) -> None:
    prefix = f'iss-{version}'
    members = {name: (ROOT / name).read_bytes() for name in FILES} | extra
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode='w', format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(f'{prefix}/{name}')
            info.size = len(members[name])
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ''
            tar.addfile(info, io.BytesIO(members[name]))
    with open(output, 'wb') as out, gzip.GzipFile(fileobj=out, mode='wb', mtime=mtime, filename='') as gz:
        gz.write(raw.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--version', required=True)
    parser.add_argument('--openapi-json', type=pathlib.Path, help='add this file as openapi.json')
    parser.add_argument('--output', type=pathlib.Path, default=pathlib.Path('dist.tar.gz'))
    args = parser.parse_args(argv)
    extra = {'openapi.json': args.openapi_json.read_bytes()} if args.openapi_json else {}
    build(args.version.removeprefix('v'), args.output, extra, int(os.environ.get('SOURCE_DATE_EPOCH', '0')))
    return 0


if __name__ == '__main__':
    sys.exit(main())
