"""A TCP relay that breaks one connection, as a network does."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CuttingProxy:
    """A TCP relay in front of ISS that, once, breaks a connection after ``cut_after`` bytes.

    ``upload``: counted over everything the clients send; ``download``: over what the server
    sends to the first GET. ``pace`` slows what is counted, as a slow link would. Not a
    stand-in for ISS: every byte comes from the real server and goes to it; only the
    connection breaks, as a network does. ``requests`` holds the first piece each
    connection sent (its request line and headers).
    """

    def __init__(self, port: int, cut_after: int, direction: str = 'upload', pace: float = 0.0) -> None:
        self._target = port
        self.cut_after = cut_after
        self._pace = pace  # NOTE: seconds of wait after each piece a client sends: a slow link
        self._direction = direction
        self.cuts = 0
        self.requests: list[bytes] = []
        self._sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(('127.0.0.1', 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def cut(self) -> bool:
        return self.cuts > 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        upstream = socket.create_connection(('127.0.0.1', self._target))
        first = client.recv(65536)
        self.requests.append(first)
        counted_download = self._direction == 'download' and first.startswith(b'GET ') and not self.cuts
        threading.Thread(target=self._pipe, args=(upstream, client, counted_download, 0), daemon=True).start()
        self._pipe(client, upstream, self._direction == 'upload', 0, first)

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool, sent: int, first: bytes = b'') -> None:
        try:
            data = first
            while data or (data := source.recv(65536)):
                if counted:
                    with self._lock:
                        total = self._sent if self._direction == 'upload' else sent
                        cut = not self.cuts and total + len(data) > self.cut_after
                        if cut:
                            self.cuts += 1
                            data = data[: self.cut_after - total]
                        self._sent += len(data)
                        sent += len(data)
                    if cut:
                        sink.sendall(data)
                        break
                sink.sendall(data)
                data = b''
                if self._pace and counted:
                    time.sleep(self._pace)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()
