"""gunicorn settings for ISS, from the same environment as the app (see example.env).

``gunicorn iss:app`` reads this file from the working directory by itself.
"""

import logging

from config import Settings

_settings = Settings.from_env()

wsgi_app = 'iss:app'
bind = f'{_settings.host}:{_settings.port}'
workers = _settings.workers
# NOTE: gthread, not sync: a thread per connection, so a slow client holding an
# upload open blocks one thread, not the worker, and /health keeps answering.
# gunicorn still hands file responses to sendfile(2) with this worker.
worker_class = 'gthread'
threads = _settings.threads
keepalive = _settings.keepalive
timeout = _settings.timeout
graceful_timeout = 30
loglevel = _settings.log_level
accesslog = '-'
errorlog = '-'
# NOTE: gunicorn 27 otherwise opens a control socket under $HOME.
control_socket_disable = True


def post_fork(server, worker):
    """Send ISS's own log lines through gunicorn's error log, in its format.

    NOTE: post_fork, not post_worker_init: the worker builds the app (and
    sweeps stale temp files, which it logs) before post_worker_init runs.
    """
    iss_log = logging.getLogger('iss')
    iss_log.handlers = list(worker.log.error_log.handlers)
    iss_log.setLevel(worker.log.error_log.level)
    iss_log.propagate = False
