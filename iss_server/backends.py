"""Which store and index the settings name: the one place that chooses a backend.

Above ``storage.py`` (the interface and the file store) and ``s3store.py`` (the
store on a bucket), so that neither imports the other's chooser; ``iss.build_app``
and the command line open their store here.
"""

from __future__ import annotations

from iss_server import index
from iss_server.config import Settings
from storage import BlobStore, FileStore


def open_store(settings: Settings) -> BlobStore:
    """The store the settings name (``ISS_STORE``, ``ISS_INDEX``), not yet started.

    The index is made here and handed to the store: a file store on its own
    disk or an S3 bucket, with SQLite beside the data or a shared PostgreSQL.
    """
    store_index = index.open_index(settings.index, settings.data_dir)
    if settings.store == 'file':
        return FileStore(settings.data_dir, store_index, derived_max_bytes=settings.derived_max_bytes)
    from iss_server import s3store  # NOTE: only an S3 store needs boto3

    return s3store.S3Store(settings, store_index)
