"""Render a release's notes: its CHANGELOG.md section, the image digest, operational notes.

    python scripts/render_release_notes.py --version 1.2.3 --image ghcr.io/o/image_store_service \
        --digest sha256:... [--changelog CHANGELOG.md] [--output notes.md]

Exits 1 when CHANGELOG.md has no section for the version: a release must say what changed.
"""

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

OPERATIONS = """\
## Running this release

```sh
docker pull {image}@{digest}
cosign verify {image}@{digest} \\
  --certificate-identity-regexp 'https://github.com/.+/.github/workflows/release.yml@refs/tags/v{version}' \\
  --certificate-oidc-issuer https://token.actions.githubusercontent.com
```

- Compose: `compose.service.yaml` (ISS alone) and, with nginx in front, `compose.nginx.yaml`
  with `deploy/nginx/iss.conf.template` (in `dist.tar.gz`). Settings: `example.env`.
- Data: `/var/lib/iss` in the container; the layout is unchanged, so a data directory of any
  earlier version (FastAPI versions included) is served as it is.
- Probes: `GET /health` answers 200 `{{"ok": true}}` while the data directory takes writes and
  503 otherwise; the image's `HEALTHCHECK` runs `python /app/healthcheck.py`.
- Attached: `openapi.json`, `sbom.spdx.json` (SPDX), `provenance.intoto.jsonl` (SLSA),
  `image-digest.txt`, `dist.tar.gz`.
"""


def changelog_section(changelog: str, version: str) -> str:
    """Return the body of the ``## [version]`` section, without its heading."""
    heading = re.compile(rf'^## \[{re.escape(version)}\][^\n]*\n', re.M)
    match = heading.search(changelog)
    if match is None:
        raise LookupError(f'CHANGELOG.md has no "## [{version}]" section')
    following = re.compile(r'^## \[', re.M).search(changelog, match.end())
    body = changelog[match.end() : following.start() if following else len(changelog)]
    # Link references at the end of the file belong to no section.
    body = re.sub(r'^\[[^\]]+\]: \S+\s*$', '', body, flags=re.M)
    return body.strip()


def render(changelog: str, version: str, image: str, digest: str) -> str:
    if not re.fullmatch(r'sha256:[0-9a-f]{64}', digest):
        raise ValueError(f'not an image digest: {digest!r}')
    section = changelog_section(changelog, version)
    operations = OPERATIONS.format(image=image, digest=digest, version=version)
    return f'{section}\n\n## Image\n\n`{image}@{digest}`\n\n{operations}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--version', required=True, help='e.g. 1.2.3 (without the v)')
    parser.add_argument('--image', required=True)
    parser.add_argument('--digest', required=True)
    parser.add_argument('--changelog', type=pathlib.Path, default=ROOT / 'CHANGELOG.md')
    parser.add_argument('--output', type=argparse.FileType('w'), default='-', help='default: standard output')
    args = parser.parse_args(argv)
    try:
        notes = render(args.changelog.read_text(), args.version.removeprefix('v'), args.image, args.digest)
    except (LookupError, ValueError) as exc:
        print(f'render_release_notes: {exc}', file=sys.stderr)
        return 1
    args.output.write(notes)
    return 0


if __name__ == '__main__':
    sys.exit(main())
