"""ISS under a real gunicorn on a loopback port: what only real processes show."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest
from PIL import Image

from iss_testing.data import files_in, temp_files_open
from iss_testing.servers import Gunicorn, wait_for

MIB = 1024 * 1024


def random_file(path: pathlib.Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their id."""
    sha256 = hashlib.sha256()
    with open(path, 'wb') as out:
        for _ in range(size // MIB):
            chunk = os.urandom(MIB)
            sha256.update(chunk)
            out.write(chunk)
    return 'sha256:' + sha256.hexdigest()


def curl(*args: str) -> bytes:
    done = subprocess.run(['curl', '--silent', '--show-error', '--fail-with-body', *args], capture_output=True)
    assert done.returncode == 0, f'curl {args} failed ({done.returncode}): {done.stdout!r} {done.stderr!r}'
    return done.stdout


def peak_rss_mib(pids: list[int]) -> dict[int, float]:
    peaks = {}
    for pid in pids:
        status = pathlib.Path(f'/proc/{pid}/status').read_text()
        peaks[pid] = int(re.search(r'VmHWM:\s+(\d+) kB', status).group(1)) / 1024
    return peaks


# -----------------------------------------------------------------------------


def test_seed_readme_curl_examples_work_verbatim(server, tmp_path):
    image_path = tmp_path / 'image.jpg'
    Image.new('RGB', (64, 48), 'green').save(image_path)

    # The seed README's "Uploading an Image" and "Downloading an Image", Linux/macOS.
    uploaded = json.loads(curl('-X', 'POST', f'{server.url}/images', '-F', f'file=@{image_path}'))
    downloaded = curl('-X', 'GET', f'{server.url}/images/{uploaded["image_id"]}')

    assert downloaded == image_path.read_bytes()
    assert uploaded['filename'] == 'image.jpg'
    assert (uploaded['width'], uploaded['height'], uploaded['mime']) == (64, 48, 'image/jpeg')


@pytest.mark.parametrize('form', ['multipart', 'raw-put'])
@pytest.mark.slow
def test_512_mib_upload_streams_in_bounded_memory(server, tmp_path, form):
    big = tmp_path / 'big.bin'
    digest = random_file(big, 512 * MIB)

    if form == 'multipart':
        answer = curl('-F', f'file=@{big}', f'{server.url}/artifacts?kind=big')
    else:
        answer = curl('-T', str(big), f'{server.url}/artifacts/{digest}?kind=big')

    assert json.loads(answer)['artifact_id'] == digest
    assert json.loads(answer)['bytes'] == 512 * MIB
    peaks = peak_rss_mib(server.processes())
    assert max(peaks.values()) < 100, f'peak RSS per process (MiB): {peaks}'
    hex_digest = digest[7:]
    assert (server.data_dir / 'blobs' / hex_digest[:2] / hex_digest[2:4] / hex_digest).stat().st_size == 512 * MIB


def test_16_concurrent_uploads_of_the_same_content_give_one_blob(server):
    data = os.urandom(8 * MIB)
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    boundary = 'concurrent-boundary'
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="same.bin"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f'\r\n--{boundary}--\r\n'.encode()
    )
    barrier = threading.Barrier(16)
    results: list[tuple[int, dict]] = []

    def upload() -> None:
        barrier.wait()
        status, _, answer = server.request(
            'POST', '/artifacts?kind=same', body, {'Content-Type': f'multipart/form-data; boundary={boundary}'}
        )
        results.append((status, json.loads(answer)))

    threads = [threading.Thread(target=upload) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert sorted(status for status, _ in results) == [200] * 15 + [201]
    assert {answer['artifact_id'] for _, answer in results} == {digest}
    assert len(files_in(server.data_dir / 'blobs')) == 1
    assert len(files_in(server.data_dir / 'meta')) == 1
    assert files_in(server.data_dir / 'tmp') == []
    assert hashlib.sha256(server.request('GET', f'/artifacts/{digest}')[2]).hexdigest() == digest[7:]


def read_responses(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Read HTTP responses (each with a Content-Length) until the server closes the connection."""
    sock.settimeout(30)
    received = b''
    while chunk := sock.recv(1 << 20):
        received += chunk
    responses = []
    while received:
        head, _, rest = received.partition(b'\r\n\r\n')
        length = int(re.search(rb'(?im)^content-length: *(\d+)', head).group(1))
        responses.append((int(head.split()[1]), rest[:length]))
        received = rest[length:]
    return responses


def put_request(body: bytes, *, close: bool = False) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    connection = 'Connection: close\r\n' if close else ''
    head = f'PUT /artifacts/sha256:{digest}?kind=piped HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n'
    return (head + connection + '\r\n').encode() + body


@pytest.mark.parametrize('size', [0, 10, 100_000, 3 * MIB + 17])
def test_requests_pipelined_behind_an_upload_are_answered_in_order(server, size):
    """ISS takes an upload's bytes from the socket itself: it must take exactly the body, no more."""
    uploads = [os.urandom(size), os.urandom(size + 1)]
    boundary = 'pipedboundary'
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'.encode()
        + uploads[1]
        + f'\r\n--{boundary}--\r\n'.encode()
    )
    with socket.create_connection(('127.0.0.1', server.port)) as sock:
        sock.sendall(
            put_request(uploads[0])
            + (
                f'POST /artifacts?kind=piped HTTP/1.1\r\nHost: x\r\nContent-Length: {len(form)}\r\n'
                f'Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n'
            ).encode()
            + form
            + b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
        )
        responses = read_responses(sock)

    assert [status for status, _ in responses] == [201, 201, 200]
    ids = ['sha256:' + hashlib.sha256(data).hexdigest() for data in uploads]
    assert [json.loads(body)['artifact_id'] for _, body in responses[:2]] == ids
    assert json.loads(responses[2][1]) == {'ok': True}
    for blob_id, data in zip(ids, uploads, strict=True):
        assert server.request('GET', f'/artifacts/{blob_id}')[2] == data


def test_a_large_json_body_is_read_whole(server):
    """POST /blobs/missing reads its whole body at once: 10,000 ids arrive in many socket reads."""
    ids = [f'sha256:{index:064x}' for index in range(10_000)]

    status, _, body = server.request('POST', '/blobs/missing', json.dumps({'ids': ids}).encode())

    assert status == 200, body
    assert json.loads(body)['missing'] == ids


def trickle(port: int, request: bytes, piece: int) -> list[tuple[int, bytes]]:
    """Send ``request`` in pieces of ``piece`` bytes, each in its own packet, a pause between."""
    with socket.create_connection(('127.0.0.1', port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), piece):
            sock.sendall(request[start : start + piece])
            time.sleep(0.0005)
        return read_responses(sock)


def test_a_body_that_trickles_in_small_pieces_is_stored_whole(server):
    body = os.urandom(300 * 1000)

    responses = trickle(server.port, put_request(body, close=True), 1000)

    assert [status for status, _ in responses] == [201]
    assert json.loads(responses[0][1])['bytes'] == len(body)


def test_a_form_that_trickles_in_small_pieces_is_stored_whole(server):
    # Bytes like the start of a delimiter every 12 bytes: many are cut in two between receives.
    data = b''.join(b'\r\n--tric' + bytes([i % 80]) * 4 for i in range(300 * 1000 // 12))
    form = (
        b'--trickle\r\nContent-Disposition: form-data; name="file"; filename="t.bin"\r\n\r\n'
        + data
        + b'\r\n--trickle--\r\n'
    )
    request = (
        b'POST /artifacts?kind=t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
        b'Content-Type: multipart/form-data; boundary=trickle\r\n'
        + f'Content-Length: {len(form)}\r\n\r\n'.encode()
        + form
    )

    responses = trickle(server.port, request, 997)

    assert [status for status, _ in responses] == [201]
    assert json.loads(responses[0][1])['artifact_id'] == 'sha256:' + hashlib.sha256(data).hexdigest()


def test_a_chunked_body_in_many_chunks_is_stored_whole_and_the_connection_kept(server):
    """Each receive of a chunked body is paced (iss_server.bodies.receiving_through), and only while it is read."""
    body = os.urandom(300 * 1000)
    chunks = b''.join(
        b'%x\r\n' % len(piece) + piece + b'\r\n' for piece in (body[i : i + 997] for i in range(0, len(body), 997))
    )
    request = (
        b'POST /artifacts?kind=chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'
        + chunks
        + b'0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    )

    responses = trickle(server.port, request, 1000)

    assert [status for status, _ in responses] == [201, 200]
    assert json.loads(responses[0][1])['artifact_id'] == 'sha256:' + hashlib.sha256(body).hexdigest()


def test_a_body_cut_short_by_a_half_close_is_400_and_stores_nothing(server):
    request = put_request(os.urandom(MIB))
    with socket.create_connection(('127.0.0.1', server.port)) as sock:
        sock.sendall(request[: len(request) - 1000])
        sock.shutdown(socket.SHUT_WR)
        responses = read_responses(sock)

    assert [status for status, _ in responses] == [400]
    assert json.loads(responses[0][1])['title'] == 'Incomplete request body'
    assert files_in(server.data_dir / 'blobs') == []
    assert files_in(server.data_dir / 'tmp') == []


@pytest.mark.parametrize(
    ('fields', 'status'),
    [
        (b'X-Big: ' + b'a' * 60000 + b'\r\n', 200),
        (b'X-A: b\r\n' * 97, 200),
        (b'X-Big: ' + b'a' * 66000 + b'\r\n', 431),
        (
            b'X-A: ' + b'a' * 30000 + b'\r\n' + b'X-B: ' + b'b' * 30000 + b'\r\n' + b'X-C: ' + b'c' * 30000 + b'\r\n',
            431,
        ),
        (b'X-A: b\r\n' * 101, 431),
    ],
    ids=['one-60k-field', '100-fields', 'one-field-over-64k', 'fields-over-64k-in-all', '101-fields'],
)
def test_request_headers_are_431_over_64_kib_in_all_or_100_fields_and_not_before(server, fields, status):
    """Issue 29: README's "431 request headers over 64 KiB", but one field over 8190 bytes (a tus Upload-Metadata of
    a few names) was 431 too, and a head that came whole in one receive was not held to 64 KiB (90 KB: 200)."""
    with socket.create_connection(('127.0.0.1', server.port)) as sock:
        sock.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\n' + fields + b'Connection: close\r\n\r\n')
        responses = read_responses(sock)

    assert [answer_status for answer_status, _ in responses] == [status]
    if status == 431:
        assert json.loads(responses[0][1])['status'] == 431


def start_upload_and_stall(server: Gunicorn, declared: int, sent: int, source: str = '127.0.0.1') -> socket.socket:
    """Open a PUT that declares ``declared`` bytes, send ``sent`` of them, and stop; ``source``: the client address."""
    sock = socket.create_connection(('127.0.0.1', server.port), source_address=(source, 0))
    sock.sendall(
        f'PUT /artifacts/sha256:{"1" * 64}?kind=partial HTTP/1.1\r\nHost: x\r\n'
        f'Content-Length: {declared}\r\n\r\n'.encode()
    )
    sock.sendall(os.urandom(sent))
    return sock


def uploads_in_flight(server: Gunicorn) -> list[str]:
    """The temp files the server's processes hold open under its tmp/ (unnamed ones too: ``O_TMPFILE``)."""
    return temp_files_open(server.data_dir / 'tmp', server.processes())


def test_client_that_disconnects_mid_upload_leaves_nothing(server):
    sock = start_upload_and_stall(server, declared=64 * MIB, sent=4 * MIB)
    wait_for(lambda: uploads_in_flight(server), message='the upload to reach a temp file')

    sock.close()

    wait_for(lambda: not uploads_in_flight(server), message='the temp file to be removed')
    assert files_in(server.data_dir / 'tmp') == []
    assert files_in(server.data_dir / 'blobs') == []
    assert server.request('GET', '/health')[0] == 200


def test_temp_files_of_a_killed_server_are_swept_when_it_restarts(start, tmp_path):
    """An unnamed temp file goes with the killed process; a named one (no O_TMPFILE, a replace) is swept."""
    first = start()
    sock = start_upload_and_stall(first, declared=64 * MIB, sent=2 * MIB)
    wait_for(lambda: uploads_in_flight(first), message='the upload to reach a temp file')
    named = [path for path in uploads_in_flight(first) if not path.endswith(' (deleted)')]

    first.kill()
    sock.close()
    assert len(files_in(first.data_dir / 'tmp')) == len(named), 'an unnamed temp file goes with its process'
    if not named:  # NOTE: what a dead writer leaves where a temp file has a name (no O_TMPFILE, a replace)
        (first.data_dir / 'tmp' / 'upload-left-by-a-dead-worker').write_bytes(b'partial')
    second = start(first.data_dir)

    assert files_in(second.data_dir / 'tmp') == []
    assert files_in(second.data_dir / 'blobs') == []
    assert '"level": "warning", "logger": "iss.storage", "pid": ' in second.log_path.read_text()
    assert '"message": "removed 1 stale temp file(s) from ' in second.log_path.read_text()


def test_a_data_directory_laid_out_by_the_seed_is_served(start, tmp_path):
    data_dir = tmp_path / 'seed-data'
    image = tmp_path / 'seed.png'
    Image.new('RGB', (30, 20), 'blue').save(image)
    content = image.read_bytes()
    hex_digest = hashlib.sha256(content).hexdigest()
    artifact = b'test artifact data'
    artifact_hex = hashlib.sha256(artifact).hexdigest()
    # Exactly what the FastAPI version's upload_image and upload_artifact wrote.
    for hexd, data, meta in (
        (
            hex_digest,
            content,
            {
                'kind': 'image',
                'bytes': len(content),
                'mime': 'image/png',
                'width': 30,
                'height': 20,
                'created_at': 1719000000.123,
            },
        ),
        (
            artifact_hex,
            artifact,
            {'test_key': 'test_value', 'kind': 'test_artifact', 'bytes': len(artifact), 'created_at': 1719000001.5},
        ),
    ):
        for top, name, payload in (('blobs', hexd, data), ('meta', f'{hexd}.json', json.dumps(meta).encode())):
            path = data_dir / top / hexd[:2] / hexd[2:4] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload)

    server = start(data_dir)

    status, headers, body = server.request('GET', f'/images/sha256:{hex_digest}')
    assert (status, headers['Content-Type'], body) == (200, 'image/png', content)
    status, headers, body = server.request('GET', f'/artifacts/sha256:{artifact_hex}')
    assert (status, headers['Content-Type'], body) == (200, 'application/octet-stream', artifact)
    assert json.loads(server.request('GET', f'/artifacts/sha256:{artifact_hex}/meta')[2])['test_key'] == 'test_value'


def start_under_strace(start, tmp_path: pathlib.Path, calls: str) -> tuple[Gunicorn, pathlib.Path]:
    """gunicorn under strace, which writes the given system calls of all its processes to the returned file."""
    strace = shutil.which('strace')
    assert strace, f'strace is needed to see {calls}: apt-get install strace (.ci/run does)'
    trace = tmp_path / 'trace.txt'
    return start(wrapper=[strace, '-f', '-qq', '-e', f'trace={calls}', '-o', str(trace)]), trace


def traced_calls(trace: pathlib.Path) -> list[tuple[str, str]]:
    """Each call of the trace as (thread, the whole call with its result), in the order strace wrote them.

    NOTE: a call another thread interrupted is written in two lines (``<unfinished ...>``, then
    ``<... resumed>``); its result is on the second: they are joined here.
    """
    unfinished: dict[str, str] = {}
    calls = []
    for line in trace.read_text().splitlines():
        thread, call = line.split(maxsplit=1)  # NOTE: strace pads a pid of under 5 digits with spaces
        if call.endswith('<unfinished ...>'):
            unfinished[thread] = call.removesuffix('<unfinished ...>')
            continue
        if call.startswith('<... '):
            call = unfinished.pop(thread, '') + call.split('resumed>', 1)[1]
        calls.append((thread, call))
    return calls


def put_random(server: Gunicorn, size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    digest = 'sha256:' + hashlib.sha256(data).hexdigest()
    assert server.request('PUT', f'/artifacts/{digest}?kind=big', data)[0] == 201
    return data, digest


def test_downloads_go_out_with_sendfile(start, tmp_path):
    server, trace = start_under_strace(start, tmp_path, 'sendfile')
    data, digest = put_random(server, 5 * MIB)

    full = server.request('GET', f'/artifacts/{digest}')
    ranged = server.request('GET', f'/artifacts/{digest}', headers={'Range': 'bytes=1000-2999'})

    assert full[2] == data
    assert (ranged[0], ranged[2]) == (206, data[1000:3000])

    # NOTE: strace writes a call's line after it returns, maybe after the client has the bytes. A response
    # goes in as many calls as the kernel has room for (iss_server/sending.py), each from where the last ended.
    def sent() -> list[tuple[int, int]]:
        moved = (re.match(r'sendfile\(\d+, \d+, \[(\d+)\]\s*=>\s*\[(\d+)\]', call) for _, call in traced_calls(trace))
        return [(int(found[1]), int(found[2])) for found in moved if found]

    # NOTE: strace lags its tracees under load. The full download may go in one call: the test waits for its end
    # (not for the call starting last, which the ranged one's is then)
    both = lambda: (1000, 3000) in sent() and max(end for _, end in sent()) == 5 * MIB  # noqa: E731
    wait_for(both, seconds=30, message='both sendfiles')
    full = sorted(call for call in sent() if call != (1000, 3000))
    assert full[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(full)), full


def test_a_large_upload_has_the_disk_start_writing_while_it_arrives(start, tmp_path):
    """Every 8 MiB received, the disk is asked to start writing them (the final flush then has little to do)."""
    server, trace = start_under_strace(start, tmp_path, 'sync_file_range,syncfs')

    put_random(server, 20 * MIB)

    pattern = r'sync_file_range\(\d+, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\) = 0|(syncfs)'
    wait_for(lambda: 'syncfs' in trace.read_text(), seconds=30, message='the blob to be flushed')
    calls = re.findall(pattern, trace.read_text())
    ranges = [(int(offset), int(length)) for offset, length, _ in calls if offset]
    # NOTE: from the start, one after the other, each of 8 to 9 MiB (the body arrives in pieces of up to 1 MiB)
    assert [offset for offset, _ in ranges] == [0, ranges[0][1]], calls
    assert all(8 * MIB <= length < 9 * MIB for _, length in ranges), calls
    assert calls[len(ranges)][2] == 'syncfs', 'the blob is flushed after its writeback was started'


def test_an_upload_is_answered_only_after_the_flushes_that_make_it_durable(start, tmp_path):
    """The thread that answers an upload, lone or a batch, has made its three flushes before it sends a byte."""
    server, trace = start_under_strace(start, tmp_path, 'syncfs,sendto')
    boundary = 'b0undary'
    files = [os.urandom(1000) for _ in range(20)]
    batch = (
        b''.join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'.encode()
            + data
            + b'\r\n'
            for data in files
        )
        + f'--{boundary}--\r\n'.encode()
    )

    put_random(server, 1000)
    status, _, _ = server.request(
        'POST', '/artifacts?kind=batch', batch, {'Content-Type': f'multipart/form-data; boundary={boundary}'}
    )

    assert status == 201
    wait_for(lambda: trace.read_text().count('HTTP/1.1 201') == 2, seconds=30, message='both answers in the trace')
    lines = trace.read_text().splitlines()
    for answer in [i for i, line in enumerate(lines) if 'HTTP/1.1 201' in line]:
        thread = lines[answer].split()[0]
        before = [line for line in lines[:answer] if line.split()[0] == thread]
        since_last_answer = before[max((i for i, line in enumerate(before) if 'sendto' in line), default=-1) + 1 :]
        flushes = [line for line in since_last_answer if re.search(r'syncfs(\(\d+|.*resumed>).*= 0$', line)]
        assert len(flushes) == 3, '\n'.join(since_last_answer)


def upload_steps(trace: pathlib.Path) -> list[list[str]]:
    """What the thread answering each upload did for it, in order (strace of openat, write, link, syncfs, sendto).

    Steps, repeats collapsed: ``bytes`` (a write to a temp file: the upload's or its meta's),
    ``flush`` (a syncfs returned 0), ``blob named`` and ``meta named`` (a link that succeeded),
    ``answer`` (the body of the answer, which names the artifact, sent). Whatever a thread did
    before its previous answer (a /health probe's, another upload's) is not counted.
    """
    steps: dict[str, list[str]] = {}
    temp_fds: dict[str, set[str]] = {}
    answers = []
    for thread, call in traced_calls(trace):
        done = steps.setdefault(thread, [])
        step = None
        if 'O_TMPFILE' in call and (fd := re.search(r'= (\d+)$', call)):
            temp_fds.setdefault(thread, set()).add(fd.group(1))
        elif (fd := re.match(r'write\((\d+),', call)) and fd.group(1) in temp_fds.get(thread, ()):
            step = 'bytes'
        elif call.startswith('syncfs(') and call.endswith('= 0'):
            step = 'flush'
        elif re.match(r'link(at)?\(', call) and call.endswith('= 0'):
            step = 'meta named' if '/meta/' in call else 'blob named' if '/blobs/' in call else None
        elif call.startswith('sendto(') and '"HTTP/1.1 ' not in call:  # NOTE: the head goes first, then the body
            if '{\\"artifact_id\\"' in call:
                answers.append([*done, 'answer'])
            steps[thread], temp_fds[thread] = [], set()
        if step and (not done or done[-1] != step):
            done.append(step)
    return answers


def test_a_new_small_upload_is_written_flushed_named_and_flushed_before_its_answer(start, tmp_path):
    """The order that makes a blob durable before its 201, on the path of small uploads (in memory, then O_TMPFILE).

    The bytes (the blob's and its meta's) are flushed before the blob gets its name, the blob's
    name before its meta's, and the meta's name before the answer: a crash at any point leaves
    the blob wholly there or not at all, and never a meta without its blob.
    """
    server, trace = start_under_strace(start, tmp_path, 'openat,write,link,linkat,syncfs,sendto')

    put_random(server, 3000)

    wait_for(lambda: upload_steps(trace), seconds=30, message='the answer in the trace')
    assert upload_steps(trace) == [['bytes', 'flush', 'blob named', 'flush', 'meta named', 'flush', 'answer']]


def test_a_small_upload_of_content_already_stored_is_answered_without_a_write(start, tmp_path):
    server, trace = start_under_strace(start, tmp_path, 'openat,write,link,linkat,syncfs,sendto')
    data, digest = put_random(server, 3000)

    assert server.request('PUT', f'/artifacts/{digest}?kind=small', data)[0] == 200

    # NOTE: strace writes a call's line after it returns; on a loaded machine, seconds after the answer.
    wait_for(lambda: len(upload_steps(trace)) == 2, seconds=30, message='both answers in the trace')
    assert upload_steps(trace)[1] == ['answer']


def test_health_answers_while_slow_clients_upload(server):
    # NOTE: from 8 addresses: one holds at most a quarter of a worker's body places (iss_server/worker.py)
    stalled = [
        start_upload_and_stall(server, declared=10 * MIB, sent=64 * 1024, source=f'127.0.0.{4 + number}')
        for number in range(8)
    ]
    try:
        wait_for(lambda: len(uploads_in_flight(server)) == 8, message='8 uploads in flight')

        started = time.monotonic()
        status, _, body = server.request('GET', '/health')

        assert (status, json.loads(body)) == (200, {'ok': True})
        assert time.monotonic() - started < 2
    finally:
        for sock in stalled:
            sock.close()


def test_a_client_that_stalls_mid_body_is_dropped_after_the_body_timeout(start):
    server = start(ISS_BODY_TIMEOUT='2')
    sock = start_upload_and_stall(server, declared=10 * MIB, sent=MIB)
    wait_for(lambda: uploads_in_flight(server), message='the upload to reach a temp file')
    stalled_at = time.monotonic()

    wait_for(lambda: not uploads_in_flight(server), seconds=15, message='the stalled upload to be dropped')
    dropped_after = time.monotonic() - stalled_at
    # NOTE: the connection closes after the answer: the rest of that body is not waited for.
    responses = read_responses(sock)
    sock.close()

    assert 1.5 < dropped_after < 8, dropped_after
    assert [status for status, _ in responses] == [400]
    answer = responses[0][1].decode()
    assert '"Incomplete request body"' in answer
    assert files_in(server.data_dir / 'blobs') == []


@pytest.mark.parametrize(
    'request_bytes, status',
    [
        (b'GET /health?' + b'x' * 9000 + b' HTTP/1.1\r\nHost: x\r\n\r\n', 414),
        (b'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'y' * 70000 + b'\r\n\r\n', 431),
        (b'GARBAGE\r\n\r\n', 400),
        (b'POST /artifacts?kind=k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello', 400),
    ],
    ids=['request-line-too-long', 'header-too-large', 'not-http', 'two-content-lengths'],
)
def test_requests_gunicorn_refuses_itself_are_answered_in_json(server, request_bytes, status):
    with socket.create_connection(('127.0.0.1', server.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        answer = b''
        while chunk := sock.recv(65536):
            answer += chunk

    head, _, body = answer.partition(b'\r\n\r\n')
    assert head.startswith(f'HTTP/1.1 {status} '.encode()), head
    assert b'Content-Type: application/json' in head
    assert json.loads(body)['status'] == status


def test_meta_in_a_long_query_string_is_accepted(server):
    meta = json.dumps({'note': 'n' * 5000})

    status, _, body = server.request(
        'POST', '/artifacts?kind=k&meta=' + urllib.parse.quote(meta), b'data', {'Content-Type': 'text/plain'}
    )

    assert status == 201, body
