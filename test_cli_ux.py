"""What a new operator meets first (issue 25): a taken port, a python without ISS's packages, the
command line's options, sizes, counts and help, and its progress line beside its errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from iss_server import cli
from iss_testing import HERE
from iss_testing.cli import run_cli, upload_image


@pytest.fixture(autouse=True)
def no_settings_from_the_shell(monkeypatch):
    """Run each command with ISS's defaults, whatever ISS_* the developer's shell sets."""
    for name in list(os.environ):
        if name.startswith('ISS_'):
            monkeypatch.delenv(name)


# -- starting the server ------------------------------------------------------------


def test_gunicorn_on_a_taken_port_says_so_in_one_line_and_exits_at_once(tmp_path):
    with socket.create_server(('127.0.0.1', 0)) as holder:
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, '-m', 'gunicorn', 'iss:app'],
            cwd=HERE,
            env={**os.environ, 'ISS_HOST': '127.0.0.1', 'ISS_PORT': str(port), 'ISS_DATA': str(tmp_path / 'data')},
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started

    assert result.returncode != 0
    # NOTE: gunicorn alone retries for five seconds, then says only "Can't connect".
    assert took < 4, f'took {took:.1f} s'
    lines = [line for line in result.stderr.splitlines() if str(port) in line]
    assert len(lines) == 1, result.stderr
    assert 'in use' in lines[0] and 'ISS_PORT' in lines[0] and "Can't connect" not in result.stderr


def test_gunicorn_on_an_address_not_of_this_host_names_iss_host(tmp_path):
    # NOTE: 192.0.2.1 is TEST-NET-1 (RFC 5737), on no host's interface.
    env = {**os.environ, 'ISS_HOST': '192.0.2.1', 'ISS_DATA': str(tmp_path / 'data')}
    result = subprocess.run(
        [sys.executable, '-m', 'gunicorn', 'iss:app'], cwd=HERE, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode != 0
    assert 'iss: cannot listen on 192.0.2.1:8000 (Cannot assign requested address)' in result.stderr
    assert 'ISS_HOST' in result.stderr and "Can't connect" not in result.stderr


def test_gunicorn_starts_on_a_free_port_as_before(start):
    server = start()

    assert server.request('GET', '/health')[0] == 200


def test_python_m_iss_without_its_packages_says_what_to_install():
    # NOTE: -S leaves site-packages out: a python without falcon, Pillow and the rest.
    result = subprocess.run(
        [sys.executable, '-S', '-m', 'iss', 'stats'], cwd=HERE, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == cli.UNUSABLE
    assert 'Traceback' not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert 'is not installed' in result.stderr and 'pip install -r requirements.txt' in result.stderr


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    'argv',
    [
        ['--data', 'D', '--json', '--progress', 'fsck'],
        ['fsck', '--data', 'D', '--json', '--progress'],
        ['--json', 'fsck', '--data', 'D', '--progress'],
    ],
)
def test_every_common_option_works_before_or_after_the_command(argv):
    args = cli.parser().parse_args(argv)

    assert (args.command, args.data, args.json, args.progress) == ('fsck', 'D', True, True)


def _commands() -> dict:
    """Each command's parser, by name (from argparse's own table)."""
    return cli.parser()._subparsers._group_actions[0].choices


def test_every_command_takes_json_and_data():
    for name, command in _commands().items():
        options = {option for action in command._actions for option in action.option_strings}
        assert {'--json', '--data', '--progress'} <= options, name


def test_help_shows_no_rest_markup():
    texts = [cli.parser().format_help()]
    texts += [command.format_help() for command in _commands().values()]

    for text in texts:
        assert '``' not in text and ':func:' not in text and ':meth:' not in text
    assert 'ISS_STORE' in texts[0] and 'Exit codes' in texts[0]


@pytest.mark.parametrize(
    'size, text',
    [
        (0, '0 bytes'),
        (1, '1 byte'),
        (999, '999 bytes'),
        (1_500, '1.5 kB'),
        (82_046_100_000, '82.0 GB'),
        (999_960_000, '1.0 GB'),
        (3 * 10**12, '3.0 TB'),
    ],
)
def test_sizes_read_as_a_person_reads_them(size, text):
    assert cli._size(size) == text


def test_counts_agree_with_their_noun():
    assert [cli._count(n, 'blob') for n in (0, 1, 2, 1234)] == ['0 blobs', '1 blob', '2 blobs', '1,234 blobs']


@pytest.mark.parametrize(
    'seconds, text', [(0.0123, '12 ms'), (42.5, '42.5 s'), (200, '3 min 20 s'), (7500, '2 h 5 min')]
)
def test_durations_read_as_a_person_reads_them(seconds, text):
    assert cli._duration(seconds) == text


def test_sign_as_text_says_when_the_url_expires(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('ISS_SIGNING_KEY', 'the key')
    monkeypatch.setattr(time, 'time', lambda: 1_800_000_000)

    assert cli.main(['--data', str(tmp_path), 'sign', 'sha256:' + 'ab' * 32, '--expires', '60']) == cli.OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('url: /images/sha256:') and 'expires=1800000060' in lines[0]
    assert lines[1:] == ['expires: 2027-01-15 08:01:00 UTC']


@pytest.mark.file_store
def test_stats_as_text_and_as_json(data_dir, client, png):
    upload_image(client, png)
    text = run_cli('stats', data_dir=data_dir).stdout
    as_json = json.loads(run_cli('stats', '--json', data_dir=data_dir).stdout)

    assert 'image: 1 blob,' in text and '1 blobs' not in text
    free = next(line for line in text.splitlines() if line.startswith('free bytes: ')).split()
    assert free[3] in {'kB', 'MB', 'GB', 'TB'} and float(free[2].replace(',', '')) < 1000, free
    assert set(as_json) == {'count', 'bytes', 'kinds', 'free_bytes'}


def test_an_error_starts_a_line_of_its_own_below_the_progress_line(tmp_path, monkeypatch, capsys):
    def failing(store, args, progress):
        progress.show('fsck  3 blobs  1.0 MB')
        raise cli.UsageError('the disk went away')

    monkeypatch.setattr(cli, 'stats', failing)

    assert cli.main(['--data', str(tmp_path), '--progress', 'stats']) == cli.UNUSABLE
    err = capsys.readouterr().err
    assert err == '\r\x1b[Kfsck  3 blobs  1.0 MB\r\x1b[Kerror: the disk went away\n'


def test_progress_stays_off_stderr_that_is_no_terminal(tmp_path, capsys):
    (tmp_path / 'folder').mkdir()
    (tmp_path / 'folder' / 'a.bin').write_bytes(b'a')

    assert cli.main(['--data', str(tmp_path), 'import', str(tmp_path / 'folder'), '--kind', 'k']) == cli.OK
    assert capsys.readouterr().err == ''
