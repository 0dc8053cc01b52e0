"""iss_server/cli.py alone: the arguments ``python -m iss`` takes, and how it refuses what it cannot run.

What each command does to a store (through a subprocess, as an operator runs it):
test_operations.py, test_images.py (backfill) and test_cluster.py (on S3).
"""

from __future__ import annotations

import json
import os
import urllib.parse

import pytest

from iss_server import cli, signing

DIGEST = 'sha256:' + 'ab' * 32


@pytest.fixture(autouse=True)
def no_settings_from_the_shell(monkeypatch):
    """Run each command with ISS's defaults, whatever ISS_* the developer's shell sets."""
    for name in list(os.environ):
        if name.startswith('ISS_'):
            monkeypatch.delenv(name)


@pytest.mark.parametrize('argv', [['--json', 'stats'], ['stats', '--json']])
def test_the_output_options_work_before_or_after_the_command(argv):
    args = cli.parser().parse_args(argv)

    assert (args.command, args.json, args.progress, args.function) == ('stats', True, False, cli.stats)


def test_the_defaults_of_each_command():
    assert cli.parser().parse_args(['stats']).json is False
    gc = cli.parser().parse_args(['gc'])
    assert (gc.dry_run, gc.uploads_older_than) == (False, 24 * 3600)
    assert cli.parser().parse_args(['fsck']).repair is False
    signer = cli.parser().parse_args(['sign', DIGEST, 'w=256', 'fit=cover'])
    assert (signer.id, signer.params, signer.expires, signer.artifact) == (DIGEST, ['w=256', 'fit=cover'], 3600, False)
    importer = cli.parser().parse_args(['--data', '/srv', 'import', 'photos', '--kind', 'scan.v2'])
    assert (importer.data, importer.directory, importer.kind, importer.manifest) == ('/srv', 'photos', 'scan.v2', None)


@pytest.mark.parametrize(
    'argv',
    [
        [],
        ['nope'],
        ['migrate'],
        ['import', 'photos', '--kind', 'has space'],
        ['import', 'photos', '--kind', 'k' * 65],
        ['sign'],
        ['sign', DIGEST, '--expires', 'soon'],
        ['gc', '--uploads-older-than', 'a day'],
    ],
)
def test_a_bad_command_line_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.parser().parse_args(argv)

    assert exited.value.code == cli.UNUSABLE
    assert 'usage: python -m iss' in capsys.readouterr().err


def test_a_missing_data_directory_is_exit_2_with_the_reason(tmp_path, capsys):
    missing = tmp_path / 'missing'

    assert cli.main(['--json', '--data', str(missing), 'stats']) == cli.UNUSABLE
    captured = capsys.readouterr()
    assert captured.out == ''
    assert json.loads(captured.err) == {'error': f'{missing} is not a directory (set ISS_DATA or --data)'}


@pytest.mark.parametrize(
    'env, argv, error',
    [
        ({}, [], 'signing needs ISS_SIGNING_KEY'),
        ({'ISS_SIGNING_KEY': 'k'}, ['--expires', '0'], '--expires is 1 to 604800 seconds'),
        ({'ISS_SIGNING_KEY': 'k'}, ['--expires', str(7 * 24 * 3600 + 1)], '--expires is 1 to 604800 seconds'),
        ({'ISS_SIGNING_KEY': 'k'}, ['expires=9'], 'expires and signature are added, not given'),
    ],
)
def test_sign_refuses_what_it_cannot_sign(tmp_path, monkeypatch, capsys, env, argv, error):
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert cli.main(['--json', '--data', str(tmp_path), 'sign', DIGEST, *argv]) == cli.UNUSABLE
    assert error in json.loads(capsys.readouterr().err)['error']


def test_sign_prints_a_url_the_server_accepts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('ISS_SIGNING_KEY', 'the key')

    assert cli.main(['--data', str(tmp_path), '--json', 'sign', DIGEST, 'w=64', '--artifact']) == cli.OK
    url = json.loads(capsys.readouterr().out)['url']
    path, _, query = url.partition('?')
    assert path == f'/artifacts/{DIGEST}'
    signing.verify(('the key',), path, dict(urllib.parse.parse_qsl(query)))
    assert dict(urllib.parse.parse_qsl(query))['w'] == '64'
