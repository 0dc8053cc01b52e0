"""``python -m iss``: the operator's commands, run beside (or without) the service.

Every command works on the store of ``ISS_STORE`` (the data directory of
``ISS_DATA`` or ``--data``, or an S3 bucket) and its ``ISS_INDEX``, safely while
gunicorn serves it: they go through the same store, with the same locks.
``migrate`` copies the store to another one. Exit codes: 0 all is well, 1 problems were found (or some files
could not be imported), 2 the command could not run (usage, configuration,
an unusable data directory), 130 stopped by Ctrl-C. ``--json`` prints one JSON document instead of
text, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import storage
from iss_server import doors, images, index, maintenance, meta, signing
from iss_server.blobs import parse_id
from iss_server.config import ConfigError, Settings
from iss_server.errors import BlobNotFound, CorruptBlob, ServiceError
from iss_server.files import files_below, manifest_entry, media_type

OK, PROBLEMS, UNUSABLE = 0, 1, 2
#: Stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


class Progress:
    """One self-overwriting status line on stderr, when a person is watching it."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._last = 0.0
        self._showing = False

    def show(self, text: str, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self._enabled or (not final and now - self._last < 0.1):
            return
        self._last = now
        sys.stderr.write(f'\r\x1b[K{text}' + ('\n' if final else ''))
        sys.stderr.flush()
        self._showing = not final

    def clear(self) -> None:
        """Wipe an unfinished status line, so that what is printed next starts a line of its own."""
        if self._showing:
            sys.stderr.write('\r\x1b[K')
            sys.stderr.flush()
            self._showing = False


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total if total else width
    return '[' + '#' * filled + '.' * (width - filled) + ']'


def _size(size: int) -> str:
    """``size`` bytes as a person reads it: ``512 bytes``, ``1.5 MB``, ``80.1 GB`` (in 1000s, as disks are sold)."""
    if size < 1000:
        return _count(size, 'byte')
    scaled = float(size)
    for unit in ('kB', 'MB', 'GB', 'TB'):  # noqa: B007 - the unit the loop stops at is the one shown
        scaled /= 1000
        if scaled < 999.95:
            break
    return f'{scaled:,.1f} {unit}'


def _count(number: int, noun: str) -> str:
    """``1 blob``, ``2 blobs``: the noun agrees with its number."""
    return f'{number:,} {noun}' + ('' if number == 1 else 's')


def _date(unix_seconds: float) -> str:
    """``2026-12-02 19:25:00 UTC``."""
    return f'{datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC):%Y-%m-%d %H:%M:%S} UTC'


def _duration(seconds: float) -> str:
    """``12 ms``, ``42.5 s``, ``3 min 20 s``, ``2 h 5 min``."""
    if seconds < 1:
        return f'{seconds * 1000:.0f} ms'
    if seconds < 60:
        return f'{seconds:.3g} s'
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f'{minutes} min {seconds} s'
    return f'{minutes // 60} h {minutes % 60} min'


# -- the commands ---------------------------------------------------------------


def fsck(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    report = maintenance.verify(
        store,
        repair=args.repair,
        describe=_describe_unknown_blob,
        progress=lambda blobs, size: progress.show(f'fsck  {_count(blobs, "blob")}  {_size(size)}'),
    )
    progress.show(f'fsck  {_count(report.blobs, "blob")}  {_size(report.bytes)}', final=True)
    result = {
        'blobs': report.blobs,
        'bytes': report.bytes,
        'seconds': round(time.monotonic() - started, 3),
        'problems': report.problems,
        'clean': report.clean,
    }
    return (OK if report.clean else PROBLEMS), result


def _describe_unknown_blob(file: IO[bytes], stat: os.stat_result) -> dict[str, Any]:
    """The meta fsck --repair writes for a blob that has none: an image if Pillow says so."""
    try:
        return meta.identified_image(file, stat.st_size, stat.st_mtime)
    except (images.NotAnImage, images.ImageTooLarge):
        return meta.recovered(stat.st_size, stat.st_mtime)


def backfill(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    """Complete the meta of every image written by the FastAPI version (format, mode, EXIF, ...)."""
    result: dict[str, Any] = {'images': 0, 'completed': 0, 'failed': []}
    for blob_id, stored in store.metas():
        if stored.get('kind') != 'image':
            continue
        result['images'] += 1
        if meta.lacks_fields(stored):
            try:
                completed = meta.complete_image(store, blob_id, args.settings.max_image_pixels)
            except BlobNotFound:
                continue
            if completed is None:
                result['failed'].append({'id': blob_id, 'reason': 'Pillow cannot identify it'})
            else:
                result['completed'] += 1
        progress.show(f'backfill  {_count(result["images"], "image")}  {result["completed"]:,} completed')
    progress.show(f'backfill  {_count(result["images"], "image")}  {result["completed"]:,} completed', final=True)
    return (PROBLEMS if result['failed'] else OK), result


def gc(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    removed = maintenance.collect_garbage(store, dry_run=args.dry_run, upload_age=args.uploads_older_than)
    return OK, {'dry_run': args.dry_run, 'removed': removed}


def migrate(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    """Copy every blob and its meta to another store, each verified; run again to resume.

    A blob the target has already (with its meta) is skipped, so an interrupted
    copy goes on where it stopped; with ``--verify`` it is read back there and
    hashed too, and one that does not match is quarantined there and copied anew.
    Each blob is staged by the target, hashed as it streams, and committed only
    when it hashes to its name: one that does not is reported as corrupt and not
    copied. The target's index gets a row per blob. Ctrl-C stops after the blob
    being copied (a second one at once), with what was done and how to go on.
    """
    target = storage.open_store(_target_settings(args))
    result: dict[str, Any] = {'to': args.to, 'blobs': 0, 'copied': 0, 'present': 0, 'bytes': 0, 'failed': []}
    if args.verify:
        result.update(verified=0, recopied=0)
    blobs = list(store.stored_blobs())
    total_bytes = sum(size for _, size in blobs)
    with _finishing_on_interrupt(progress) as interrupted:
        try:
            for done, (hex_digest, size) in enumerate(blobs, 1):
                if interrupted.is_set():
                    break
                _migrate_blob(store, target, hex_digest, size, args.verify, result)
                result['blobs'] += 1
                result['bytes'] += size
                status = f'{_bar(result["bytes"], total_bytes)} {done:,}/{_count(len(blobs), "blob")}'
                progress.show(f'migrate  {status}  {_size(result["bytes"])}', final=done == len(blobs))
        except KeyboardInterrupt:
            interrupted.set()  # NOTE: the second Ctrl-C: the blob in hand is committed or not, never half
    if interrupted.is_set():
        again = 'run the same command again to go on (what is there is skipped'
        result['interrupted'] = f'after {_count(result["blobs"], "blob")} of {len(blobs):,}: {again}' + (
            '; --verify re-hashes it)' if not args.verify else ')'
        )
        return INTERRUPTED, result
    return (PROBLEMS if result['failed'] else OK), result


def _migrate_blob(
    store: storage.BlobStore,
    target: storage.BlobStore,
    hex_digest: str,
    size: int,
    verify: bool,
    result: dict[str, Any],
) -> None:
    """Copy one blob and its meta unless the target has them (``verify``: hashed there, else copied anew)."""
    blob_id = 'sha256:' + hex_digest
    try:
        present = not target.missing([blob_id]) and target.read_meta(blob_id) is not None
        if present and verify:
            actual = _hash_of(target, hex_digest)
            if actual == hex_digest:
                result['verified'] += 1
            else:
                target.quarantine(hex_digest, f'migrate --verify: its bytes hash to {actual}')
                result['recopied'] += 1
                present = False
        if present:
            result['present'] += 1
            return
        source_meta = store.read_meta(blob_id) or meta.recovered(size, time.time())
        # NOTE: typing.IO declares no readinto, which a blob's file has
        with contextlib.closing(store.open(blob_id).file) as source, target.stage(source) as staged:  # type: ignore[arg-type]
            if staged.digest != blob_id:
                raise CorruptBlob(f'{blob_id} hashes to {staged.digest}')
            target.commit(staged, source_meta)
        result['copied'] += 1
    except (BlobNotFound, CorruptBlob) as exc:
        result['failed'].append({'id': blob_id, 'reason': str(exc)})


def _hash_of(store: storage.BlobStore, hex_digest: str) -> str:
    """What a stored blob's bytes hash to, read back as the backend has them."""
    sha256 = hashlib.sha256()
    with contextlib.closing(store.open_unverified(hex_digest)) as file:
        while chunk := file.read(1024 * 1024):
            sha256.update(chunk)
    return sha256.hexdigest()


@contextlib.contextmanager
def _finishing_on_interrupt(progress: Progress) -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) sets the event instead of raising, so the work in hand ends first; a second one raises.

    NOTE: a KeyboardInterrupt in the middle of a copy would land in whatever runs then (an S3
    call, a cleanup), which may raise anew over it: a traceback, and a staged upload left behind.
    """
    interrupted = threading.Event()

    def finish_first(signum: int, frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        progress.clear()
        sys.stderr.write('stopping after the blob in hand (Ctrl-C again to stop at once)\n')

    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # NOTE: only the main thread may handle signals (a test calling main() in a thread)
        return
    previous = signal.signal(signal.SIGINT, finish_first)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _target_settings(args: argparse.Namespace) -> Settings:
    """The settings of ``--to``: ``s3://BUCKET[/PREFIX]`` (with ``--to-index``) or a data directory."""
    settings = args.settings
    if args.to.startswith('s3://'):
        to_index = args.to_index or settings.index
        if to_index == 'sqlite':
            raise UsageError('an S3 store needs a shared index: --to-index postgresql://...')
        probe = Settings.from_env({'ISS_STORE': args.to, 'ISS_INDEX': to_index})
        return dataclasses.replace(settings, store=probe.store, index=probe.index)
    os.makedirs(args.to, exist_ok=True)
    return dataclasses.replace(settings, store='file', data_dir=args.to, index=args.to_index or 'sqlite')


def reindex(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    started = time.monotonic()
    counts = store.reindex()
    return OK, {**counts, 'seconds': round(time.monotonic() - started, 3)}


def stats(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    return OK, {**index.totals_document(store.totals()), 'free_bytes': store.check()['free_bytes']}


def import_files(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    """Store every file below a directory, as images (default) or as artifacts of ``--kind``.

    APPSEC: a symlink is followed only while it stays inside the directory; one that
    leads out (to ``/etc/passwd``, say) is skipped and reported, never stored.
    """
    if not os.path.isdir(args.directory):
        raise UsageError(f'{args.directory} is not a directory')
    files, skipped = files_below([args.directory])
    result: dict[str, Any] = {
        'files': len(files) + len(skipped),
        'new': 0,
        'existing': 0,
        'bytes': 0,
        'skipped': skipped,
        'failed': [],
        'manifest': [],
    }
    for done, (path, relative) in enumerate(files, 1):
        try:
            with open(path, 'rb') as file, store.stage(file) as staged:
                with staged.open() as stored:
                    import_meta = _import_meta(args.kind, path, stored, staged.size)
                committed = store.commit(staged, import_meta)
        except images.NotAnImage:
            result['skipped'].append({'path': path, 'reason': 'not an image Pillow can identify (use --kind)'})
        except images.ImageTooLarge as exc:
            result['skipped'].append({'path': path, 'reason': f'image too large: {exc}'})
        except OSError as exc:
            result['failed'].append({'path': path, 'reason': exc.strerror or type(exc).__name__})
        else:
            result['new' if committed.created else 'existing'] += 1
            result['bytes'] += staged.size
            result['manifest'].append(manifest_entry(relative, staged.digest, staged.size, committed.created))
        status = f'{_bar(done, len(files))} {done:,}/{_count(len(files), "file")}  {_size(result["bytes"])}'
        progress.show(f'import  {status}', final=done == len(files))
    if args.manifest:
        with open(args.manifest, 'w') as out:
            out.writelines(json.dumps(entry) + '\n' for entry in result['manifest'])
    return (PROBLEMS if result['failed'] or result['skipped'] else OK), result


def _import_meta(kind: str | None, path: str, file: IO[bytes], size: int) -> dict[str, Any]:
    name = os.path.basename(path)
    if kind is None:
        return meta.identified_image(file, size, filename=name)
    return meta.artifact(kind, size, media_type(name), filename=name)


def sign(store: storage.BlobStore, args: argparse.Namespace, progress: Progress) -> tuple[int, dict[str, Any]]:
    if not args.settings.signing_key:
        raise UsageError('signing needs ISS_SIGNING_KEY')
    hex_digest = parse_id(args.id)
    params = dict(param.partition('=')[::2] for param in args.params)
    if not 0 < args.expires <= signing.MAX_EXPIRES_IN or any(name in signing.PARAMETERS for name in params):
        raise UsageError(
            f'--expires is 1 to {signing.MAX_EXPIRES_IN} seconds; expires and signature are added, not given'
        )
    path = doors.location(index.ARTIFACTS if args.artifact else index.IMAGES, f'sha256:{hex_digest}')
    return OK, {'url': signing.signed_path(args.settings.signing_key, path, params, args.expires)}


# -- the command line -----------------------------------------------------------


class UsageError(Exception):
    """The command was given something it cannot work with."""


Command = Callable[[storage.BlobStore, argparse.Namespace, Progress], tuple[int, dict[str, Any]]]


def _kind(text: str) -> str:
    if not meta.KIND_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError('1 to 64 characters of A-Z, a-z, 0-9, ".", "_" or "-"')
    return text


def _plain(text: str) -> str:
    """A docstring as argparse should show it: without reST's ``literals`` and :role:`targets`."""
    return re.sub(r':\w+:`([^`]*)`|``([^`]*)``', lambda found: found[1] or found[2], text).strip()


def parser() -> argparse.ArgumentParser:
    summary, *details = _plain(__doc__).split('\n\n')
    top = argparse.ArgumentParser(prog='python -m iss', description=summary, epilog=' '.join(details))
    commands = top.add_subparsers(dest='command', required=True, metavar='COMMAND')

    # NOTE: the common options work before or after the command: each is on the top parser
    # and on every command's, where SUPPRESS keeps the command's default from undoing one
    # given before it.
    common = argparse.ArgumentParser(add_help=False)
    for options in (top, common):
        default: dict[str, Any] = {} if options is top else {'default': argparse.SUPPRESS}
        options.add_argument('--data', help='the data directory (default: $ISS_DATA, else ./data)', **default)
        options.add_argument('--json', action='store_true', help='print one JSON document, for scripts', **default)
        options.add_argument(
            '--progress', action='store_true', help='show progress even when stderr is no terminal', **default
        )

    def command(name: str, function: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(function=function)
        return sub

    command('fsck', fsck, 're-hash every blob; report corrupt, orphaned or missing files and index rows').add_argument(
        '--repair', action='store_true', help='quarantine corrupt blobs, fix meta and the index'
    )
    collector = command(
        'gc',
        gc,
        'remove stale temp files; meta, index rows and derivatives of no blob; derivatives over ISS_DERIVED_MAX_BYTES',
    )
    collector.add_argument('--dry-run', action='store_true', help='count what would go, remove nothing')
    collector.add_argument(
        '--uploads-older-than',
        type=float,
        default=24 * 3600,
        metavar='SECONDS',
        help="on S3: abort multipart uploads started longer ago (default a day: no node's own upload lasts that long)",
    )
    mover = command('migrate', migrate, 'copy every blob and its meta to another store, verified; resumable')
    mover.add_argument('--to', required=True, help='s3://BUCKET[/PREFIX] (ISS_S3_ENDPOINT, AWS_*) or a data directory')
    mover.add_argument('--to-index', help="the target's index: sqlite (a data directory's) or postgresql://...")
    mover.add_argument(
        '--verify', action='store_true', help='also re-hash the blobs the target has already; copy a corrupt one anew'
    )
    command('backfill', backfill, 'complete the meta of images stored by the FastAPI version')
    command('reindex', reindex, 'rebuild the index from the blob and meta files')
    command('stats', stats, 'count blobs and bytes per kind')
    signer = command('sign', sign, 'print a URL that reads ID without a token until it expires (ISS_SIGNING_KEY)')
    signer.add_argument('id', metavar='ID')
    signer.add_argument('--artifact', action='store_true', help='under /artifacts (default: /images)')
    signer.add_argument('--expires', type=int, default=3600, help='seconds it stays valid (default 3600)')
    signer.add_argument(
        'params', nargs='*', metavar='NAME=VALUE', help='derivative parameters it is for: w=256 h=256 fit=cover ...'
    )
    importer = command('import', import_files, 'store every file below DIRECTORY (as images unless --kind)')
    importer.add_argument('directory', metavar='DIRECTORY')
    importer.add_argument('--kind', type=_kind, help='store the files as artifacts of this kind')
    importer.add_argument('--manifest', metavar='FILE', help='also write the manifest there, one JSON line a file')
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    progress = Progress(args.progress or (sys.stderr.isatty() and not args.json))
    try:
        args.settings = Settings.from_env()
        if args.data:
            args.settings = dataclasses.replace(args.settings, data_dir=args.data)
        store = storage.open_store(args.settings, existing=True)
        status, result = args.function(store, args, progress)
    except (UsageError, ConfigError, ServiceError) as exc:
        progress.clear()
        _print(args, {'error': str(exc)}, stream=sys.stderr)
        return UNUSABLE
    except KeyboardInterrupt:
        progress.clear()
        sys.stderr.write('interrupted\n')
        return INTERRUPTED
    finally:
        progress.clear()
    _print(args, result)
    return status


def _print(args: argparse.Namespace, result: dict[str, Any], stream: IO[str] | None = None) -> None:
    """The result as one JSON document (``--json``), else as lines a person reads."""
    stream = stream or sys.stdout
    if args.json:
        json.dump(result, stream, indent=2)
        stream.write('\n')
        return
    for key, value in result.items():
        label = key.replace('_', ' ')
        if key == 'manifest':
            stream.write(f'{label}: {_count(len(value), "file")} (--json or --manifest FILE to see them)\n')
        elif isinstance(value, list):
            stream.write(f'{label}: {len(value):,}\n')
            for item in value:
                stream.write('  ' + '  '.join(f'{k}={v}' for k, v in item.items() if v is not None) + '\n')
        elif key == 'kinds':
            stream.write(f'{label}:\n')
            for name, totals in value.items():
                stream.write(f'  {name or "(no meta)"}: {_count(totals["count"], "blob")}, {_size(totals["bytes"])}\n')
        elif isinstance(value, dict):
            stream.write(f'{label}: ' + ', '.join(f'{name} {count:,}' for name, count in value.items()) + '\n')
        elif key.endswith('bytes') and isinstance(value, int):
            exact = f' ({_count(value, "byte")})' if value >= 1000 else ''
            stream.write(f'{label}: {_size(value)}{exact}\n')
        elif key == 'seconds':
            stream.write(f'took: {_duration(value)}\n')
        elif key == 'url':
            stream.write(f'{label}: {value}\n')
            expires = urllib.parse.parse_qs(urllib.parse.urlsplit(value).query).get('expires')
            if expires:
                stream.write(f'expires: {_date(int(expires[0]))}\n')
        else:
            stream.write(
                f'{label}: {value:,}\n'
                if isinstance(value, int) and not isinstance(value, bool)
                else f'{label}: {value}\n'
            )
