"""The ``iss-client`` command: push, pull, ls, meta, rm, stats, dupes, mirror and watch, over :class:`Client`.

Exit codes: 0 all done, 1 some items failed (each named on stderr), 2 usage or no server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from iss_client import dupes, mirror
from iss_client.files import files_below, hash_stream, inside, known_id, manifest_entry, remember_id
from iss_client.library import Client, CursorExpired, ISSError, Stored, Unreachable, image_type, upload_way

OK, SOME_FAILED, USAGE = 0, 1, 2

# NOTE: what push stores a file that is no image as, unless --other-kind (or --kind) names another kind.
DEFAULT_KIND = 'file'
_NOT_AN_IMAGE = 'not an image: push it without --images-only (an artifact then; --other-kind names its kind)'
# PERF: a batch (upload_way's) holds at most this many files and bytes.
_BATCH_FILES = 100
_BATCH_BYTES = 8 * 1024 * 1024

DESCRIPTION = 'Push files to an ISS and pull them back, each verified against its sha256.'
EPILOG = """\
push sends a whole tree in one run: images to /images, every other file as an artifact
of kind "file" (--other-kind KIND names another; --kind KIND stores images as artifacts
of that kind too; --images-only refuses what is no image). Only what the server lacks is sent. pull
restores the files under their names. mirror keeps a second ISS a copy of the first
(--follow: until Ctrl-C; resumable); watch prints the store's changes as JSON lines.
The options above work before or after the
command: iss-client --json stats, iss-client stats --json.

exit codes: 0 all done, 1 some items failed (each named on stderr), 2 usage or no server
environment: ISS_URL (--url), ISS_API_TOKEN (--token)"""


class _Console:
    """What a person watching stderr sees: error lines, and below them a progress line they never run into.

    The progress line (files, bytes, rate, ETA) is redrawn in place with ``\\r``, only on
    a terminal; an error clears it, is written on a line of its own, and the progress line
    is drawn again below it.
    """

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._lock = threading.Lock()
        self._line = ''
        self._files = self._bytes = self._done_files = self._done_bytes = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def start(self, files: int, size: int) -> None:
        self._files, self._bytes = files, size
        self._started = time.monotonic()

    def advance(self, size: int) -> None:
        with self._lock:
            self._done_files += 1
            self._done_bytes += size
            now = time.monotonic()
            if self._enabled and (now - self._drawn >= 0.1 or self._done_files == self._files):
                self._drawn = now
                self._line = self._progress(now)
                sys.stderr.write(f'\r\x1b[K{self._line}')
                sys.stderr.flush()

    def error(self, what: str, reason: str) -> None:
        with self._lock:
            sys.stderr.write(('\r\x1b[K' if self._line else '') + f'iss-client: {what}: {reason}\n')
            sys.stderr.write(self._line)
            sys.stderr.flush()

    def finish(self) -> None:
        """Leave the last progress line as it stands, and end it."""
        with self._lock:
            if self._line:
                sys.stderr.write('\n')
                self._line = ''

    def _progress(self, now: float) -> str:
        rate = self._done_bytes / max(now - self._started, 1e-6)
        left = int((self._bytes - self._done_bytes) / rate) if rate else 0
        return (
            f'{self._done_files:,}/{_count(self._files, "file")}  {_size(self._done_bytes)}/{_size(self._bytes)}'
            f'  {_size(rate)}/s  ETA {left // 60}:{left % 60:02d}'
        )


def _size(count: float) -> str:
    """A number of bytes as a person reads it: 512 B, 1.2 MB, 82.0 GB."""
    if count < 1000:
        return f'{count:.0f} B'
    for unit in ('kB', 'MB', 'GB', 'TB'):
        count /= 1000
        if count < 1000:
            return f'{count:.1f} {unit}'
    return f'{count / 1000:.1f} PB'


def _count(number: int, noun: str) -> str:
    """``1 blob``, ``2 blobs``."""
    return f'{number:,} {noun}' + ('' if number == 1 else 's')


def _date(value: object) -> str:
    """A Unix time as ISO 8601 in this machine's zone (anything else as it is)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value).astimezone().isoformat(timespec='seconds')
    return str(value or '')


def _reason(exc: BaseException, args: argparse.Namespace) -> str:
    """What went wrong, in words that name the option that mends it."""
    if isinstance(exc, Unreachable):
        return f'cannot reach {args.url}: {exc.reason} (is the server running there? --url or $ISS_URL)'
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if not isinstance(exc, ISSError):
        return str(exc)
    if exc.status == 415:
        return 'not an image: the server cannot read it as one' if args.command == 'dupes' else _NOT_AN_IMAGE
    said = str(exc).rstrip('.')
    if exc.status == 401 and args.token:
        return f'{said}; the token given was refused: check --token or $ISS_API_TOKEN'
    if exc.status == 401:
        return f'{said}; no token was given: pass --token or set $ISS_API_TOKEN'
    if exc.status == 403 and args.command == 'rm':
        return f"{exc}; deleting takes the admin token (the server's ISS_ADMIN_TOKEN), given with --token"
    if exc.title in ('Invalid kind', 'Invalid meta'):
        return f'{"--kind" if exc.title == "Invalid kind" else "--meta"}: {exc.description}'
    return str(exc)


def _parallel(
    work: Callable[[Any], Any], items: Sequence[Any], jobs: int
) -> Iterator[tuple[Any, Any, Exception | None]]:
    """Run ``work`` on each item with ``jobs`` threads; yield (item, result, error) as each ends."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(work, item): item for item in items}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except Exception as exc:
                    yield futures[future], None, exc
        finally:
            pool.shutdown(cancel_futures=True)  # NOTE: a caller that stops early waits for no more work


def _outcome(call: Callable[[], Stored]) -> Stored | Exception:
    try:
        return call()
    except Exception as exc:
        return exc


# -- push ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _File:
    """A file to push: where it is, what it is stored as (``kind`` None: an image), and its id if known before."""

    path: str
    relative: str
    info: os.stat_result
    kind: str | None
    id: str | None

    @property
    def size(self) -> int:
        return self.info.st_size


def _look_at(args: argparse.Namespace, path: str, relative: str) -> _File:
    """A file's size, door and id: hashed now, or remembered (unchanged since), or left to be hashed as it is sent."""
    with open(path, 'rb') as file:
        info = os.fstat(file.fileno())
        is_image = bool(image_type(file.read(12)))
        if args.images_only and not is_image:
            # NOTE: refused here, not by the server: bytes it has already would pass as stored
            raise ValueError(_NOT_AN_IMAGE)
        kind = args.kind or (None if is_image or args.images_only else args.other_kind)
        blob_id = known_id(path, info)
        if blob_id is None and upload_way(info.st_size, id_known=False) in ('batch', 'by-id'):
            file.seek(0)
            blob_id = hash_stream(file)
    return _File(path, relative, info, kind, blob_id)


def push(client: Client, args: argparse.Namespace, console: _Console) -> int:
    paths, skipped = files_below(args.paths)
    for item in skipped:
        console.error(item['path'], item['reason'])
    failed = bool(skipped)
    files: list[_File] = []
    for (path, _), found, exc in _parallel(lambda item: _look_at(args, *item), paths, args.jobs):
        if exc is not None:
            console.error(path, _reason(exc, args))
            failed = True
        else:
            files.append(found)
    files.sort(key=lambda found: found.path)
    # NOTE: one question for every id known; a file the server has is not sent, nor is
    # more than one file of the same bytes.
    missing = set(client.missing(list(dict.fromkeys(found.id for found in files if found.id))))
    console.start(len(files), sum(found.size for found in files))
    sending: dict[str, _File] = {}
    for found in files:
        if found.id in missing and sending.setdefault(found.id, found) is found:
            continue
        if found.id is not None:
            console.advance(found.size)  # NOTE: stored already, or the same bytes as a file sent
    unknown = [found for found in files if found.id is None]
    meta = json.loads(args.meta) if args.meta else None
    sent: dict[str, Stored] = {}  # NOTE: by the path of the file sent
    work = [[found] for found in unknown] + _batches(list(sending.values()))
    for batch, outcomes, exc in _parallel(lambda batch: _upload(client, args, meta, batch), work, args.jobs):
        for found, outcome in zip(batch, outcomes or [exc] * len(batch), strict=True):
            if isinstance(outcome, Exception):
                console.error(found.path, _reason(outcome, args))
                failed = True
            else:
                sent[found.path] = outcome
                if found.id is None:
                    remember_id(found.path, found.info, outcome.id)  # NOTE: the next push asks first
            console.advance(found.size)
    entries: list[dict[str, Any]] = []
    for found in files:
        sender = found if found.id is None else sending.get(found.id)
        if sender is None:
            assert found.id is not None  # NOTE: a file without an id is its own sender
            entries.append(manifest_entry(found.relative, found.id, found.size, False))
        elif sender.path in sent:
            stored = sent[sender.path]
            entries.append(manifest_entry(found.relative, stored.id, found.size, sender is found and stored.new))
        # NOTE: else its upload failed, and was named above
    entries.sort(key=lambda entry: entry['path'])
    _write_manifest(entries, args.manifest)
    return SOME_FAILED if failed else OK


def _batches(files: list[_File]) -> list[list[_File]]:
    """The files upload_way sends in batches, in batches of one kind (the largest first); every other file alone."""
    work: list[list[_File]] = []
    batches: dict[str | None, list[_File]] = {}
    sizes: dict[str | None, int] = {}
    for found in sorted(files, key=lambda found: -found.size):
        if upload_way(found.size, id_known=True) != 'batch':
            work.append([found])
            continue
        batch = batches.setdefault(found.kind, [])
        if batch and (len(batch) == _BATCH_FILES or sizes[found.kind] + found.size > _BATCH_BYTES):
            work.append(batch)
            batch = batches[found.kind] = []
        if not batch:
            sizes[found.kind] = 0
        batch.append(found)
        sizes[found.kind] += found.size
    return work + [batch for batch in batches.values() if batch]


def _upload(client: Client, args: argparse.Namespace, meta: Any, work: list[_File]) -> list[Stored | Exception]:
    """Send one file, or a batch; what each file became, in order."""
    if len(work) == 1:
        return [_outcome(lambda: _put(client, args, meta, work[0]))]
    contents = [(pathlib.Path(found.path).read_bytes(), os.path.basename(found.path)) for found in work]
    try:
        outcomes: list[Stored | ISSError | None] = list(client.put_many(contents, kind=work[0].kind, meta=meta))
    except ISSError as exc:
        if exc.title != 'Two files':
            raise
        outcomes = [None] * len(work)  # NOTE: a server from before batch uploads takes one file per request
    return [
        _outcome(functools.partial(_put, client, args, meta, found, outcome))
        if outcome is None or _not_an_image(outcome, found, args)
        else outcome
        for found, outcome in zip(work, outcomes, strict=True)
    ]


def _put(client: Client, args: argparse.Namespace, meta: Any, found: _File, refused: Any = None) -> Stored:
    """One file by itself; one the image door refused as no image goes in as an artifact (not with --images-only)."""
    if refused is None:
        try:
            return client.put(found.path, kind=found.kind, meta=meta, digest=found.id)
        except ISSError as exc:
            if not _not_an_image(exc, found, args):
                raise
    # NOTE: bytes that began as an image's do (a damaged file); the server's Pillow said no
    return client.put(found.path, kind=args.other_kind, meta=meta, digest=found.id)


def _not_an_image(outcome: object, found: _File, args: argparse.Namespace) -> bool:
    """Whether the image door refused the file as no image, in a push that stores such files as artifacts."""
    return isinstance(outcome, ISSError) and outcome.status == 415 and found.kind is None and not args.images_only


def _write_manifest(entries: list[dict[str, Any]], manifest: str | None) -> None:
    lines = ''.join(json.dumps(entry) + '\n' for entry in entries)
    if manifest:
        with open(manifest, 'w') as out:
            out.write(lines)
    else:
        sys.stdout.write(lines)


# -- the other commands ----------------------------------------------------------------


def pull(client: Client, args: argparse.Namespace, console: _Console) -> int:
    failed = False
    if args.manifest:
        with open(args.manifest) as file:
            entries = [json.loads(line) for line in file if line.strip()]
        wanted = [(entry['id'], entry['path'], entry.get('bytes', 0)) for entry in entries]
    else:
        wanted = []
        for blob_id in args.ids:
            try:
                stored = client.meta(blob_id)
            except ISSError as exc:
                console.error(blob_id, _reason(exc, args))
                failed = True
                continue
            wanted.append(
                (blob_id, _stored_name(blob_id, stored, {name for _, name, _ in wanted}), stored.get('bytes', 0))
            )
    output = pathlib.Path(args.output).resolve()
    todo: list[tuple[str, pathlib.Path, int]] = []
    for blob_id, relative, size in wanted:
        target = (output / relative).resolve()
        # APPSEC: a manifest names paths below the output directory, never outside it.
        if not inside(str(target), str(output)) or target == output:
            console.error(relative, 'a path outside the output directory')
            failed = True
            continue
        todo.append((blob_id, target, size))
    console.start(len(todo), sum(size for _, _, size in todo))
    pulled = 0
    for (blob_id, target, size), got, error in _parallel(lambda item: client.get(*item[:2]), todo, args.jobs):
        if error is not None:
            console.error(f'{blob_id} -> {target}', _reason(error, args))
            failed = True
        else:
            pulled += got
            if args.json:
                print(json.dumps({'id': blob_id, 'path': str(target), 'bytes': got}))
        console.advance(size)
    console.finish()
    if not args.json:
        print(f'{_count(len(todo), "file")} ({_size(pulled)}) pulled into {output}')
    return SOME_FAILED if failed else OK


def _stored_name(blob_id: str, stored: dict[str, Any], taken: set[str]) -> str:
    """The file name a blob was stored under (its base name only), else, or if taken already, its hex digest."""
    name = stored.get('filename')
    name = os.path.basename(name.replace('\\', '/')) if isinstance(name, str) else ''
    if name in ('', '.', '..') or name in taken:
        return blob_id.removeprefix('sha256:')
    return name


def ls(client: Client, args: argparse.Namespace, console: _Console) -> int:
    collection = 'images' if args.images else 'artifacts'
    items = client.list(collection, kind=args.kind, created_after=args.after, created_before=args.before)
    for count, item in enumerate(items, 1):
        if args.json:
            print(json.dumps(item))
        else:
            print(
                f'{item["id"]}  {item.get("kind", ""):<10} {_size(item.get("bytes", 0)):>9}'
                f'  {_date(item.get("created_at"))}  {item.get("filename") or ""}'
            )
        if args.limit and count >= args.limit:
            break
    return OK


def meta_command(client: Client, args: argparse.Namespace, console: _Console) -> int:
    failed = False
    for blob_id in args.ids:
        try:
            found = client.meta(blob_id)
        except ISSError as exc:
            console.error(blob_id, _reason(exc, args))
            failed = True
            continue
        if args.json:
            print(json.dumps({'id': blob_id, **found}))
        else:
            print(blob_id)
            for key, value in found.items():
                print(f'  {key}: {_shown(key, value)}')
    return SOME_FAILED if failed else OK


def _shown(key: str, value: Any) -> str:
    """A meta field as a person reads it: dates as dates, sizes with their unit."""
    if key.endswith('_at'):
        return _date(value)
    if key == 'bytes' and isinstance(value, int):
        return f'{_size(value)} ({_count(value, "byte")})'
    return value if isinstance(value, str) else json.dumps(value)


def rm(client: Client, args: argparse.Namespace, console: _Console) -> int:
    failed = False
    for blob_id in args.ids:
        try:
            client.delete(blob_id)
        except ISSError as exc:
            console.error(blob_id, _reason(exc, args))
            failed = True
            continue
        print(json.dumps({'id': blob_id, 'deleted': True}) if args.json else f'deleted {blob_id}')
    return SOME_FAILED if failed else OK


def stats(client: Client, args: argparse.Namespace, console: _Console) -> int:
    totals = client.stats()
    if args.json:
        print(json.dumps(totals))
        return OK
    print(f'{_count(totals["count"], "blob")}, {_size(totals["bytes"])}')
    for kind, figures in totals['kinds'].items():
        print(f'  {kind or "(no meta)"}: {_count(figures["count"], "blob")}, {_size(figures["bytes"])}')
    return OK


# -- dupes -----------------------------------------------------------------------------


def dupes_command(client: Client, args: argparse.Namespace, console: _Console) -> int:
    """Print the groups of near-duplicate images among local files, the store's images, or both.

    Each local image is sent to ``POST /images/similar`` (the server hashes it and stores
    nothing): the stored images it resembles join its group. With ``--store`` (or no PATH),
    every stored image's hash is listed and grouped too.
    """
    missing = [path for path in args.paths if not os.path.exists(path)]
    for path in missing:
        console.error(path, 'no such file or directory')
    if missing:
        return USAGE
    hashes: dict[str, str] = {}  # NOTE: a member is a local path or a stored id; its phash
    about: dict[str, dict[str, Any]] = {}
    links: list[tuple[str, str]] = []
    failed = False
    found, skipped = files_below(args.paths)
    for entry in skipped:
        console.error(entry['path'], entry['reason'])
        failed = True
    local, others = [], 0
    for path, _ in found:
        if not _is_regular(path):
            # NOTE: opened, a FIFO waits for a writer (the command hung); a device is read forever.
            console.error(path, 'not a regular file: skipped')
        elif _is_image_file(path):
            local.append(path)
        else:
            others += 1
    console.start(len(local), sum(os.path.getsize(path) for path in local))

    def send(path: str) -> dict[str, Any]:
        with open(path, 'rb') as file:
            return client.similar_to(file.read(), args.max_distance)

    answers: dict[str, dict[str, Any]] = {}
    for path, answer, error in _parallel(send, local, args.jobs):
        console.advance(os.path.getsize(path))
        if isinstance(error, ISSError) and (error.status in (401, 403) or isinstance(error, Unreachable)):
            raise error  # NOTE: every file would fail alike: one line (main's), and no more requests
        if error is not None:
            console.error(path, _reason(error, args))
            failed = True
            continue
        answers[path] = answer
    # NOTE: taken in the order of the paths, not of the answers (which -j interleaves): a group's first
    # member, and so every distance shown, is the same on every run.
    for path in (path for path in local if path in answers):
        answer = answers[path]
        hashes[path], about[path] = answer['phash'], {'path': path}
        for item in answer['items']:
            hashes.setdefault(item['id'], item['phash'])
            about.setdefault(item['id'], _stored(item))
            links.append((path, item['id']))
    if others:
        console.error('dupes', f'{_count(others, "file")} skipped: no image (by its first bytes)')
    if args.store or not args.paths:
        for item in client.list('images'):
            if isinstance(item.get('phash'), str):  # NOTE: none before its backfill, or when it does not decode
                hashes.setdefault(item['id'], item['phash'])
                about.setdefault(item['id'], _stored(item))
    max_distance = 10 if args.max_distance is None else args.max_distance
    for number, members in enumerate(dupes.groups(hashes, max_distance, links), 1):
        first = hashes[members[0]]
        shown = [{**about[m], 'phash': hashes[m], 'distance': dupes.distance(first, hashes[m])} for m in members]
        if args.json:
            print(json.dumps({'group': number, 'members': shown}))
            continue
        print(f'group {number}: {_count(len(members), "image")}')
        for member in shown:
            where = member.get('path') or f'{member["id"]}  {member.get("filename") or ""}'.rstrip()
            print(f'  {member["distance"]:>2}  {where}')
    return SOME_FAILED if failed else OK


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _is_image_file(path: str) -> bool:
    with open(path, 'rb') as file:
        return image_type(file.read(12)) is not None


def _stored(item: dict[str, Any]) -> dict[str, Any]:
    return {'id': item['id'], 'filename': item.get('filename')}


# -- mirror and watch ------------------------------------------------------------------


def mirror_command(client: Client, args: argparse.Namespace, console: _Console) -> int:
    source = Client(args.source, args.src_token)
    destination = Client(args.destination, args.dst_token)
    deleter = Client(args.destination, args.dst_admin_token or args.dst_token)
    state = mirror.State(
        pathlib.Path(args.state) if args.state else mirror.default_state(args.source, args.destination)
    )
    work = mirror.Mirror(source, destination, deleter, state, jobs=args.jobs, log=_log(args.quiet))
    if args.metrics_port is not None:
        mirror.serve_metrics(work.counters, args.metrics_port)
    resume = f'iss-client mirror {args.source} {args.destination} --state {state.path}'
    _stop_on_sigterm()
    try:
        source.reach()
        destination.reach()
        work.run(args.follow)
    except KeyboardInterrupt:
        print(f'iss-client: mirror stopped; resume with: {resume}', file=sys.stderr)
        return SOME_FAILED
    except ISSError as exc:
        if exc.status in (401, 403):
            exc = ISSError(exc.status, exc.title, f'{exc.description} (--src-token, --dst-token, --dst-admin-token)')
        console.error('mirror', str(exc))
        print(f'iss-client: resume with: {resume}', file=sys.stderr)
        return USAGE if isinstance(exc, Unreachable) else SOME_FAILED
    counters = work.counters
    summary = {
        'events': counters.events,
        'copied': counters.copied,
        'bytes': counters.bytes_copied,
        'deleted': counters.deleted,
    }
    print(json.dumps(summary) if args.json else f'mirror: caught up; {_count(counters.copied, "blob")} copied')
    return OK


def _log(quiet: bool) -> Callable[[str], None]:
    """A log line on stderr, with the time (none when ``quiet``)."""

    def log(line: str) -> None:
        if not quiet:
            stamp = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
            print(f'{stamp} {line}', file=sys.stderr, flush=True)

    return log


def _stop_on_sigterm() -> None:
    """Take SIGTERM (systemd, docker stop) as Ctrl-C: the same clean stop and the same last line."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def watch(client: Client, args: argparse.Namespace, console: _Console) -> int:
    cursor = args.after or 'now'
    _stop_on_sigterm()
    try:
        while True:
            try:
                for page in client.follow(cursor):
                    for event in page.events:
                        if _watched(event['item'], args):
                            _tell(event, args.exec)
                        cursor = event['cursor']
                    cursor = page.next
            except CursorExpired as exc:
                console.error('watch', f'{exc.description}; changes were missed: going on from now')
                cursor = 'now'
    except KeyboardInterrupt:
        print(f'iss-client: watch stopped; go on with --after {cursor}', file=sys.stderr)
        return OK


def _watched(item: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether an event's blob is of what ``--kind``, ``--images`` or ``--artifacts`` asks for."""
    if args.kind is not None:
        return item.get('kind') == args.kind
    if args.images or args.artifacts:
        return (item.get('kind') == 'image') == args.images
    return True


def _tell(event: dict[str, Any], command: str | None) -> None:
    """Print an event as a JSON line, and run ``command`` with it (stdin, and ISS_EVENT_* variables)."""
    line = json.dumps(event)
    print(line, flush=True)
    if command:
        env = {
            **os.environ,
            'ISS_EVENT_TYPE': event['type'],
            'ISS_EVENT_ID': event['item']['id'],
            'ISS_EVENT_KIND': str(event['item'].get('kind') or ''),
            'ISS_EVENT_CURSOR': event['cursor'],
        }
        done = subprocess.run(command, shell=True, input=line + '\n', text=True, env=env, check=False)
        if done.returncode:
            print(f'iss-client: --exec exited {done.returncode} for {event["item"]["id"]}', file=sys.stderr)


# -- the command line ------------------------------------------------------------------


def _add_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before it (``defaults``) or after it (not undoing one given before)."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    url = os.environ.get('ISS_URL', 'http://127.0.0.1:8000')
    parser.add_argument(
        '--url', default=default(url), help='the server (default: $ISS_URL, else http://127.0.0.1:8000)'
    )
    token = os.environ.get('ISS_API_TOKEN')
    parser.add_argument('--token', default=default(token), help='the bearer token (default: $ISS_API_TOKEN)')
    parser.add_argument('-j', '--jobs', type=int, default=default(8), help='requests at once (default 8)')
    parser.add_argument('-q', '--quiet', action='store_true', default=default(False), help='no progress line')
    parser.add_argument('--json', action='store_true', default=default(False), help='print JSON, a document a line')


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog='iss-client', description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_options(top, defaults=True)
    commands = top.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name: str, function: Callable[..., int], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        _add_options(sub, defaults=False)
        sub.set_defaults(function=function, remote=True)
        return sub

    pushing = command(
        'push', push, 'upload files and directories, only what the server lacks; print a manifest (JSON lines)'
    )
    pushing.add_argument('paths', nargs='+', metavar='PATH')
    pushing.add_argument(
        '--kind',
        help='store every file, images too, as an artifact of this kind (default: images as images; see --other-kind)',
    )
    pushing.add_argument(
        '--other-kind',
        default=DEFAULT_KIND,
        metavar='KIND',
        help=f'the artifact kind of the files that are no image (default: "{DEFAULT_KIND}")',
    )
    pushing.add_argument('--images-only', action='store_true', help='store images only; refuse every other file')
    pushing.add_argument('--meta', help='a JSON object of artifact meta, for every file')
    pushing.add_argument('--manifest', metavar='FILE', help='write the manifest there instead of stdout')
    pulling = command(
        'pull', pull, "download ids (or a manifest's files) into a directory, under their names, verified"
    )
    pulling.add_argument('ids', nargs='*', metavar='ID')
    pulling.add_argument('--manifest', metavar='FILE', help='a manifest of push: restore its files under its paths')
    pulling.add_argument('-o', '--output', required=True, metavar='DIR')
    listing = command('ls', ls, 'list artifacts (or --images), newest first')
    listing.add_argument('--images', action='store_true', help='list images instead')
    listing.add_argument('--kind', help='artifacts of this kind only')
    listing.add_argument('--after', help='created after (Unix seconds or ISO 8601)')
    listing.add_argument('--before', help='created before (Unix seconds or ISO 8601)')
    listing.add_argument('--limit', type=int, help='at most this many')
    command('meta', meta_command, 'print the stored meta of ids').add_argument('ids', nargs='+', metavar='ID')
    command('rm', rm, 'delete ids (needs the admin token)').add_argument('ids', nargs='+', metavar='ID')
    command('stats', stats, 'count blobs and bytes per kind')
    duplicates = command(
        'dupes',
        dupes_command,
        'print groups of near-duplicate images: local files (and the stored images they resemble), or the store',
    )
    duplicates.add_argument('paths', nargs='*', metavar='PATH', help='files and directories (default: the store)')
    duplicates.add_argument('--store', action='store_true', help="also group the store's own images")
    duplicates.add_argument(
        '--max-distance',
        type=int,
        choices=range(17),
        metavar='N',
        help="differing bits of 64 that still make a near-duplicate, 0-16 (default: the server's, 10)",
    )
    mirroring = command(
        'mirror', mirror_command, 'copy every blob of one ISS to another and apply deletes, then follow its changes'
    )
    mirroring.set_defaults(remote=False)
    mirroring.add_argument('source', metavar='SRC_URL')
    mirroring.add_argument('destination', metavar='DST_URL')
    mirroring.add_argument('--follow', action='store_true', help='keep the destination in step until Ctrl-C')
    mirroring.add_argument('--state', metavar='FILE', help='where the cursor is kept (default under ~/.cache)')
    mirroring.add_argument('--src-token', help="the source's read token (a private store)")
    mirroring.add_argument('--dst-token', help="the destination's upload token (its ISS_API_TOKEN)")
    mirroring.add_argument(
        '--dst-admin-token', help="the destination's admin token, for deletes (default: --dst-token)"
    )
    mirroring.add_argument('--metrics-port', type=int, metavar='PORT', help='serve /metrics (lag) on 127.0.0.1:PORT')
    watching = command(
        'watch', watch, 'print the changes of the store as JSON lines, from now; --exec runs a command on each'
    )
    watching.add_argument('--after', metavar='CURSOR', help='start after this cursor instead of now')
    doors = watching.add_mutually_exclusive_group()
    doors.add_argument('--kind', help='changes of artifacts of this kind only')
    doors.add_argument('--images', action='store_true', help='changes of images only')
    doors.add_argument('--artifacts', action='store_true', help='changes of artifacts only')
    watching.add_argument(
        '--exec',
        metavar='CMD',
        help='run CMD (by the shell) per change: the event on stdin, ISS_EVENT_TYPE/_ID/_KIND set',
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == 'pull' and bool(args.ids) == bool(args.manifest):
        top.error('pull takes ids or --manifest FILE, not both')
    if args.command == 'push' and args.kind and args.images_only:
        top.error('--kind stores every file as an artifact; --images-only stores images only: give one of them')
    if args.command == 'push' and args.meta:
        try:
            if not isinstance(json.loads(args.meta), dict):
                raise ValueError
        except ValueError:
            top.error('--meta must be a JSON object')
    try:
        client = Client(args.url, args.token)
    except ValueError as exc:
        top.error(f'--url: {exc}')
    console = _Console(sys.stderr.isatty() and not args.quiet)
    try:
        if args.remote:  # NOTE: mirror names its two servers itself
            client.reach()
        code: int = args.function(client, args, console)
        sys.stdout.flush()  # NOTE: a reader gone is found here, not when Python flushes at exit
        return code
    except Unreachable as exc:
        console.error(args.command, _reason(exc, args))
        return USAGE
    except ISSError as exc:
        console.error(args.command, _reason(exc, args))
        return SOME_FAILED
    except KeyboardInterrupt:
        return SOME_FAILED
    except BrokenPipeError:
        # NOTE: the reader is gone (| head): no traceback, and none at exit when Python flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SOME_FAILED
    finally:
        console.finish()
