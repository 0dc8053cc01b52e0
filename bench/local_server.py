"""What the bench scripts share beyond ``iss_testing``: a big file of new bytes, a process tree's memory."""

import hashlib
import os
import pathlib


def big_file(path: pathlib.Path, mib: int) -> str:
    """Write ``mib`` MiB of new random bytes to ``path``; return their sha256 hex."""
    sha256 = hashlib.sha256()
    with open(path, 'wb') as out:
        for _ in range(mib):
            block = os.urandom(1024 * 1024)
            sha256.update(block)
            out.write(block)
    return sha256.hexdigest()


def tree_rss_kib(pid: int) -> int:
    """The summed resident memory of a process and its children (gunicorn's master and workers), in KiB."""
    children = pathlib.Path(f'/proc/{pid}/task/{pid}/children').read_text().split()
    total = 0
    for each in (pid, *map(int, children)):
        for line in pathlib.Path(f'/proc/{each}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                total += int(line.split()[1])
    return total
