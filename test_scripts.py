"""The scripts the release workflow calls, run here as the workflow runs them."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tarfile

import pytest
import yaml

from iss_testing import HERE

DIGEST = 'sha256:' + 'ab' * 32
COMMIT = '0123456789abcdef0123456789abcdef01234567'
IMAGE = 'ghcr.io/owner/image_store_service'
CHANGELOG = """# Changelog

## [Unreleased]
- Work in progress.

## [1.2.0] - 2026-11-20
### Added
- Thumbnails.

## [1.1.0] - 2026-10-01
### Fixed
- An old bug.

[1.2.0]: https://example.invalid/compare/v1.1.0...v1.2.0
"""


def run_script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HERE / 'scripts' / name), *args], capture_output=True, text=True, **kwargs
    )


def test_release_notes_are_the_tag_section_with_digest_and_operations(tmp_path):
    changelog = tmp_path / 'CHANGELOG.md'
    changelog.write_text(CHANGELOG)

    result = run_script(
        'render_release_notes.py', '--version', 'v1.2.0', '--image', IMAGE, '--digest', DIGEST, '--changelog', changelog
    )

    assert result.returncode == 0, result.stderr
    notes = result.stdout
    assert notes.startswith('### Added\n- Thumbnails.')
    assert 'An old bug' not in notes and 'Work in progress' not in notes and 'example.invalid' not in notes
    assert f'{IMAGE}@{DIGEST}' in notes
    assert 'cosign verify' in notes and 'refs/tags/v1.2.0' in notes
    assert 'GET /health' in notes


@pytest.mark.parametrize('version, digest', [('9.9.9', DIGEST), ('1.2.0', 'sha256:short')])
def test_release_notes_refuse_a_version_without_a_section_or_a_bad_digest(tmp_path, version, digest):
    changelog = tmp_path / 'CHANGELOG.md'
    changelog.write_text(CHANGELOG)

    result = run_script(
        'render_release_notes.py', '--version', version, '--image', IMAGE, '--digest', digest, '--changelog', changelog
    )

    assert result.returncode == 1
    assert result.stdout == ''
    assert 'render_release_notes:' in result.stderr


def test_the_projects_own_changelog_renders_its_unreleased_section():
    result = run_script('render_release_notes.py', '--version', 'Unreleased', '--image', IMAGE, '--digest', DIGEST)

    assert result.returncode == 0, result.stderr
    assert '### Added' in result.stdout


def test_openapi_json_is_the_yaml_document_with_the_release_version(tmp_path):
    output = tmp_path / 'openapi.json'

    result = run_script('export_openapi.py', '--version', '1.2.0', '--output', output)

    assert result.returncode == 0, result.stderr
    exported = json.loads(output.read_text())
    expected = yaml.safe_load((HERE / 'openapi.yaml').read_text())
    expected['info']['version'] = '1.2.0'
    assert exported == expected


def test_dist_tarball_is_complete_and_reproducible(tmp_path):
    openapi = tmp_path / 'openapi.json'
    openapi.write_text('{}')
    first, second = tmp_path / 'one.tar.gz', tmp_path / 'two.tar.gz'

    for output in (first, second):
        result = run_script(
            'build_dist.py', '--version', 'v1.2.0', '--openapi-json', openapi, '--output', output,
            env={'SOURCE_DATE_EPOCH': '1700000000', 'PATH': ''},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        assert all(name.startswith('iss-1.2.0/') for name in names)
        assert {'iss-1.2.0/iss.py', 'iss-1.2.0/openapi.json', 'iss-1.2.0/deploy/nginx/iss.conf.template'} <= set(names)
        assert tar.extractfile('iss-1.2.0/storage.py').read() == (HERE / 'storage.py').read_bytes()
        assert {member.mtime for member in tar.getmembers()} == {1700000000}


def test_dist_tarball_holds_everything_the_image_is_built_from(tmp_path):
    output = tmp_path / 'dist.tar.gz'
    run_script('build_dist.py', '--version', '1.0.0', '--output', output)
    dockerfile = (HERE / 'Dockerfile').read_text()

    with tarfile.open(output) as tar:
        bundled = {str(pathlib.PurePath(*pathlib.PurePath(name).parts[1:])) for name in tar.getnames()}
    copied = {
        word
        for line in dockerfile.splitlines()
        if line.startswith('COPY ') and '--from=' not in line
        for word in line.split()[1:-1]
    }
    # NOTE: a directory copied whole (the server's package) is bundled file by file
    wanted = {
        str(path.relative_to(HERE))
        for word in copied
        for path in ([*(HERE / word).rglob('*.py')] if word.endswith('/') else [HERE / word])
    }

    assert wanted <= bundled


def test_provenance_is_an_in_toto_slsa_statement_about_the_image(tmp_path):
    output = tmp_path / 'provenance.intoto.jsonl'

    result = run_script(
        'generate_provenance.py', '--image', IMAGE, '--digest', DIGEST, '--repository', 'owner/image_store_service',
        '--commit', COMMIT, '--ref', 'refs/tags/v1.2.0', '--workflow-run', 'https://github.com/o/r/actions/runs/7',
        '--output', output,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = output.read_text().splitlines()
    assert len(lines) == 1
    statement = json.loads(lines[0])
    assert statement['_type'] == 'https://in-toto.io/Statement/v1'
    assert statement['predicateType'] == 'https://slsa.dev/provenance/v1'
    assert statement['subject'] == [{'name': IMAGE, 'digest': {'sha256': 'ab' * 32}}]
    dependency = statement['predicate']['buildDefinition']['resolvedDependencies'][0]
    assert dependency['digest'] == {'gitCommit': COMMIT}
    assert statement['predicate']['runDetails']['metadata']['invocationId'].endswith('/runs/7')


def test_provenance_refuses_a_malformed_commit(tmp_path):
    result = run_script(
        'generate_provenance.py', '--image', IMAGE, '--digest', DIGEST, '--repository', 'o/r',
        '--commit', 'main', '--ref', 'refs/tags/v1', '--workflow-run', 'x',
    )  # fmt: skip

    assert result.returncode == 1
    assert 'not a commit id' in result.stderr


def test_release_workflow_uploads_every_asset_the_seed_release_had():
    workflow = (HERE / '.github/workflows/release.yml').read_text()
    release_step = workflow[workflow.index('gh release create') :]

    for asset in (
        'openapi.json',
        'sbom.spdx.json',
        'provenance.intoto.jsonl',
        'dist.tar.gz',
        'compose.service.yaml',
        'example.env',
        'image-digest.txt',
    ):
        assert asset in release_step, asset
    assert 'linux/amd64,linux/arm64' in workflow
    assert 'cosign sign' in workflow
