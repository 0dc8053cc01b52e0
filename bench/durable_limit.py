"""The disk's limit for small uploads kept durably: ISS's file operations alone, no HTTP, no Python server.

    python -m bench.durable_limit --dir DIR [--threads 16] [--seconds 8] [--group]

A new small upload costs ISS two durable files (the blob and its meta), each: a temp file
created under tmp/, 4 KiB written, fsync, a hard link into the blobs/ab/cd fan-out (created
when missing), fsync of that directory, the temp name removed. This does exactly that from
``--threads`` threads for ``--seconds`` and prints uploads/s: the figure that iss_bench.py's
"small POST distinct" is compared with, measured in the same run, on the same disk (``--dir``
should be on the file system ISS_DATA is on).

With ``--group``, what ISS does since its group commit: the two temp files written, one
``syncfs`` shared by every thread waiting (as ``disk.Flusher``), both linked into place,
``syncfs``, ... three flushes per upload, each shared.
"""

import argparse
import os
import sys
import tempfile
import threading
import time


def durable_file(root: str, top: str, name: str, data: bytes) -> None:
    fd, temp_path = tempfile.mkstemp(dir=os.path.join(root, 'tmp'))
    try:
        os.write(fd, data)
        os.fsync(fd)
        directory = os.path.join(root, top, name[:2], name[2:4])
        os.makedirs(directory, exist_ok=True)
        os.link(temp_path, os.path.join(directory, name))
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    finally:
        os.unlink(temp_path)
        os.close(fd)


def group_upload(root: str, flush, name: str) -> None:
    temps = [tempfile.mkstemp(dir=os.path.join(root, 'tmp')) for _ in range(2)]
    try:
        for (fd, _), size in zip(temps, (4096, 300), strict=True):
            os.write(fd, os.urandom(size))
        flush()
        for (_, temp_path), top, final in zip(temps, ('blobs', 'meta'), (name, name + '.json'), strict=True):
            directory = os.path.join(root, top, name[:2], name[2:4])
            os.makedirs(directory, exist_ok=True)
            os.link(temp_path, os.path.join(directory, final))
            flush()
    finally:
        for fd, temp_path in temps:
            os.unlink(temp_path)
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dir', default=tempfile.gettempdir(), help='where to write (the file system of ISS_DATA)')
    parser.add_argument('--threads', type=int, default=16, help='like wrk -c16 against ISS')
    parser.add_argument('--seconds', type=float, default=8)
    parser.add_argument('--group', action='store_true', help="ISS's group commit: shared syncfs flushes")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix='iss-durable-', dir=args.dir)
    os.makedirs(os.path.join(root, 'tmp'))
    deadline = time.monotonic() + args.seconds
    done = [0] * args.threads

    if args.group:
        from iss_server import disk  # ISS's own flusher, from this checkout

        flush = disk.Flusher(root)

    def upload_loop(slot: int) -> None:
        while time.monotonic() < deadline:
            name = os.urandom(32).hex()
            if args.group:
                group_upload(root, flush, name)
            else:
                durable_file(root, 'blobs', name, os.urandom(4096))
                durable_file(root, 'meta', name + '.json', os.urandom(300))
            done[slot] += 1

    started, cpu_before = time.monotonic(), os.times()
    threads = [threading.Thread(target=upload_loop, args=(slot,)) for slot in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    cpu_after = os.times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    how = '3 shared syncfs each' if args.group else '4 fsyncs each'
    print(f'durable small uploads (2 files, {how}), {args.threads} threads: {sum(done) / elapsed:,.0f} uploads/s')
    # NOTE: one process's threads share one core's worth of Python; what the files cost in CPU
    # says what all the cores could do if nothing else ran.
    per_upload, cores = cpu / sum(done), os.cpu_count() or 1
    print(f'cpu per upload: {per_upload * 1e3:.3f} ms, so {cores} cores at most {cores / per_upload:,.0f}/s')
    # NOTE: left in place until the caller removes it: on ext4 without a journal, inodes freed
    # in the last seconds make the next allocations slow, which would burden whatever runs next.
    print(f'files: {root}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
