"""The ISS client for pipelines: a library (``Client``) and the ``iss-client`` command.

Standard library only (``http.client``, ``hashlib``, threads), so it installs on any machine
with Python 3.11 and nothing of the server: ``pip install /path/to/iss`` gives both.

    from iss_client import Client

    iss = Client('http://127.0.0.1:8000', token='...')
    stored = iss.put('frame.jpg')                   # hashed here first; not sent if stored
    iss.put(b'weights', kind='model', meta={'epoch': 3})
    iss.get(stored.id, 'copy.jpg')                  # verified against its id while it arrives
    for item in iss.list('artifacts', kind='model'):
        print(item['id'], item['bytes'])

Modules: ``library`` (the Client and the wire), ``files`` (this machine's side: the tree
walk, ids, media types, the cache), ``mirror`` (one store kept in step with another, from
its change feed), ``command`` (``iss-client``; also ``python -m iss_client``).
"""

from iss_client.command import main
from iss_client.files import files_below, hash_file, manifest_entry, media_type
from iss_client.library import (
    Client,
    CursorExpired,
    EventPage,
    IntegrityError,
    ISSError,
    Stored,
    Unreachable,
    upload_way,
)

__all__ = [
    'Client',
    'CursorExpired',
    'EventPage',
    'ISSError',
    'IntegrityError',
    'Stored',
    'Unreachable',
    'files_below',
    'hash_file',
    'main',
    'manifest_entry',
    'media_type',
    'upload_way',
]
