"""The disk's limit for small uploads kept durably: ISS's file operations alone, no HTTP, no Python server.

    python3 bench/durable_limit.py --dir DIR [--threads 16] [--seconds 8]

A new small upload costs ISS two durable files (the blob and its meta), each: a temp file
created under tmp/, 4 KiB written, fsync, a hard link into the blobs/ab/cd fan-out (created
when missing), fsync of that directory, the temp name removed. This does exactly that from
``--threads`` threads for ``--seconds`` and prints uploads/s: the figure that iss_bench.py's
"small POST distinct" is compared with, measured in the same run, on the same disk (``--dir``
should be on the file system ISS_DATA is on).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dir', default=tempfile.gettempdir(), help='where to write (the file system of ISS_DATA)')
    parser.add_argument('--threads', type=int, default=16, help='like wrk -c16 against ISS')
    parser.add_argument('--seconds', type=float, default=8)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix='iss-durable-', dir=args.dir)
    os.makedirs(os.path.join(root, 'tmp'))
    deadline = time.monotonic() + args.seconds
    done = [0] * args.threads

    def upload_loop(slot: int) -> None:
        while time.monotonic() < deadline:
            name = os.urandom(32).hex()
            durable_file(root, 'blobs', name, os.urandom(4096))
            durable_file(root, 'meta', name + '.json', os.urandom(300))
            done[slot] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=upload_loop, args=(slot,)) for slot in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(
        f'durable small uploads (2 files, 4 fsyncs each), {args.threads} threads: {sum(done) / elapsed:,.0f} uploads/s'
    )
    # NOTE: left in place until the caller removes it: on ext4 without a journal, inodes freed
    # in the last seconds make the next allocations slow, which would burden whatever runs next.
    print(f'files: {root}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
