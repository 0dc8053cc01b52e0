"""Write openapi.yaml as JSON (the release asset openapi.json).

    python scripts/export_openapi.py [--version 1.2.3] [--output openapi.json]

With --version, info.version is set to the release's version.
"""

import argparse
import json
import pathlib
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--spec', type=pathlib.Path, default=ROOT / 'openapi.yaml')
    parser.add_argument('--version', help='set info.version')
    parser.add_argument('--output', type=argparse.FileType('w'), default='-', help='default: standard output')
    args = parser.parse_args(argv)

    document = yaml.safe_load(args.spec.read_text())
    if args.version:
        document['info']['version'] = args.version
    text = json.dumps(document, indent=2, ensure_ascii=False) + '\n'
    args.output.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
