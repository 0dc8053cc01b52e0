"""Write the release's SLSA provenance as an in-toto statement (provenance.intoto.jsonl).

    python scripts/generate_provenance.py --image ghcr.io/o/image_store_service --digest sha256:... \
        --repository o/image_store_service --commit <sha> --ref refs/tags/v1.2.3 \
        --workflow-run https://github.com/o/r/actions/runs/1 [--output provenance.intoto.jsonl]

One JSON line: an in-toto Statement v1 whose predicate is SLSA Provenance v1, naming the
image digest as subject and the repository, commit and workflow run that built it. The
release workflow also attests the image with GitHub's signed build provenance; this file is
the same facts as a plain release asset.
"""

import argparse
import datetime
import json
import re
import sys

BUILD_TYPE = 'https://actions.github.io/buildtypes/workflow/v1'


def statement(args: argparse.Namespace, finished: str) -> dict:
    if not re.fullmatch(r'sha256:[0-9a-f]{64}', args.digest):
        raise ValueError(f'not an image digest: {args.digest!r}')
    if not re.fullmatch(r'[0-9a-f]{40}', args.commit):
        raise ValueError(f'not a commit id: {args.commit!r}')
    source = f'git+https://github.com/{args.repository}@{args.ref}'
    return {
        '_type': 'https://in-toto.io/Statement/v1',
        'subject': [{'name': args.image, 'digest': {'sha256': args.digest.removeprefix('sha256:')}}],
        'predicateType': 'https://slsa.dev/provenance/v1',
        'predicate': {
            'buildDefinition': {
                'buildType': BUILD_TYPE,
                'externalParameters': {
                    'workflow': {
                        'ref': args.ref,
                        'repository': f'https://github.com/{args.repository}',
                        'path': '.github/workflows/release.yml',
                    }
                },
                'resolvedDependencies': [{'uri': source, 'digest': {'gitCommit': args.commit}}],
            },
            'runDetails': {
                'builder': {'id': 'https://github.com/actions/runner/github-hosted'},
                'metadata': {'invocationId': args.workflow_run, 'finishedOn': finished},
            },
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ('--image', '--digest', '--repository', '--commit', '--ref', '--workflow-run'):
        parser.add_argument(name, required=True)
    parser.add_argument('--output', type=argparse.FileType('w'), default='-', help='default: standard output')
    args = parser.parse_args(argv)
    finished = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')
    try:
        line = json.dumps(statement(args, finished), separators=(',', ':')) + '\n'
    except ValueError as exc:
        print(f'generate_provenance: {exc}', file=sys.stderr)
        return 1
    args.output.write(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
