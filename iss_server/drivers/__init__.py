"""The drivers under the store: bytes under keys, and nothing else.

A driver is what differs between backends (a directory, an S3 bucket); the
content-addressing rules above it (stage and hash, dedup, the order of blob,
meta and index row, delete, quarantine, reindex, fsck, gc) are written once in
``storage.BlobStore``. A driver knows keys (``blobs/ab/cd/<hex>``,
``meta/ab/cd/<hex>.json``, ``quarantine/...``) and bytes; never rows, what a
meta means, or the index. Modelled on the OCI registry's ``StorageDriver``.

Every driver passes the one contract suite in ``test_drivers.py``; a new one
joins it by adding its factory there.

Errors: an absent key raises :class:`KeyNotFound`; a backend that cannot work
right now raises :class:`errors.StoreFailure` (``StoreUnavailable``,
``StoreFull``, ``BucketUnavailable``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import IO, Protocol


class Busy(Exception):
    """Another group holds the key, and the hold was asked not to wait."""


class KeyNotFound(LookupError):
    """Nothing is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclasses.dataclass(frozen=True)
class Stat:
    """An object's size, ``version`` (which stored copy it is) and time of writing."""

    size: int
    version: str
    modified: float


class Source(Protocol):
    """Bytes spooled on the node's disk, hashed: what a driver puts under a key."""

    # NOTE: read-only properties, so a class whose sha256 is a property is a Source too.
    @property
    def path(self) -> str:
        """The file holding the bytes, under the spool the driver was built with."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str:
        """The SHA-256 of the bytes, hex: the checksum the backend refuses them without."""

    def fileno(self) -> int: ...


class Writer(Protocol):
    """An object being written while its bytes arrive: invisible until :meth:`commit`, gone on :meth:`cancel`."""

    def write(self, piece: memoryview) -> None:
        """Append ``piece`` (a view valid only during the call)."""

    def commit(self) -> bool:
        """Make the bytes visible under the key unless an object is there; False when one was (nothing changed).

        Refused (the backend's error, nothing stored) unless they hash to the checksum given.
        """

    def cancel(self) -> None:
        """Throw away what was written; a no-op after :meth:`commit` or :meth:`cancel`."""


class Group(Protocol):
    """Puts whose durability is paid for together (:meth:`Driver.group`); holds end with the group."""

    def hold(self, key: str, *, exclusive: bool = False, wait: bool = True) -> Stat | None:
        """Keep the object from being removed or replaced by another group until this one ends; its stat.

        ``exclusive``: from being held by any other group too (a removal). A driver whose
        backend has no locks holds nothing and answers None without asking (then a put
        says whether the object exists).

        Raises:
            KeyNotFound: a holding driver found no object.
            Busy: ``wait`` is False and another group holds it.
        """

    def put(self, source: Source, key: str, *, replace: bool = False) -> bool:
        """Store ``source``'s bytes under ``key`` unless an object is there (``replace``: anyway).

        False: an object was there, nothing changed, and it is held now. Durable once
        :meth:`sync` returns (a driver whose puts are durable as they return does nothing there).
        """

    def sync(self) -> None:
        """Make durable every byte and put of this group so far (the disk's group commit)."""


class Driver(Protocol):
    """Objects under keys: what a store needs of a backend."""

    def group(self) -> AbstractContextManager[Group]:
        """A group of puts and holds, ended (and its holds released) when the block ends."""

    def writer(self, key: str, sha256: str) -> Writer | None:
        """An object under ``key`` written as its bytes arrive (which must hash to ``sha256``).

        None: the driver gains nothing by starting early (its put of the spooled file is as fast).
        """

    def read(self, key: str) -> bytes:
        """The whole of a small object (a meta document)."""

    def open(self, key: str, offset: int = 0) -> tuple[IO[bytes], Stat]:
        """An object's bytes from ``offset`` to its end, and its stat (the caller closes the reader)."""

    def stat(self, key: str) -> Stat:
        """An object's size, version and time."""

    def move(self, key: str, target: str) -> bool:
        """Move an object to another key, durably; False when it was not there."""

    def remove(self, key: str) -> bool:
        """Remove an object, durably; False when it was not there."""

    def walk(self, prefix: str) -> Iterator[tuple[str, Stat]]:
        """Every object whose key starts with ``prefix`` (``blobs/``), in no promised order.

        NOTE: the stat's size and time are the object's; its version may differ from :meth:`stat`'s.
        """

    def redirect_url(self, key: str, *, seconds: int, overrides: dict[str, str]) -> str | None:
        """A URL a client reads the object from directly for ``seconds``, or None where the backend serves none.

        ``overrides``: the ``Response*`` headers the URL answers with.
        """

    def proxy_path(self, key: str) -> str:
        """Where a proxy in front finds the object, below its internal location (``ISS_ACCEL_REDIRECT``)."""

    def location(self, key: str) -> str:
        """Where the object is, for an operator's report (a path, an ``s3://`` URL)."""

    def abandoned(self, age: float, *, dry_run: bool = False) -> dict[str, int]:
        """Remove writes begun more than ``age`` seconds ago and never committed; how many, by kind."""

    def create(self) -> bool:
        """Make the backend's container if it is missing (a bucket); True when this call made it (and logged it).

        Idempotent, and safe while other processes do the same. Raises the backend's
        StoreFailure when it cannot be asked, or when it is missing and may not be made.
        """

    def check(self) -> None:
        """Prove the backend answers and takes writes (raises the backend's StoreFailure)."""

    #: Whether reads cross a network that could change bytes: the store then verifies them.
    verify_reads: bool
    #: What ``/health`` names this backend when it fails or does not answer (``StoreFailure.part``).
    part: str
