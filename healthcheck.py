"""Container health check: exit 0 when ISS answers its probe with 200, else 1.

The slim Python image has no curl, so the Dockerfile's HEALTHCHECK and the
compose healthcheck run this, with the standard library only (and ISS's own
configuration, which needs no more)::

    python healthcheck.py            # readiness: http://127.0.0.1:$ISS_PORT/health/ready
    python healthcheck.py live       # liveness: /health/live, the process alone

Readiness (the default) is what ``docker ps`` and compose's ``service_healthy`` should
see: every engine answers (each asked with a 2 s deadline of its own, within this
probe's 4 s). Liveness is for an orchestrator that restarts what fails its probe:
restarting ISS mends no engine, so it asks only whether the process answers.
"""

import sys
import urllib.error
import urllib.request

from iss_server.config import ConfigError, Settings

PROBES = {'ready': '/health/ready', 'live': '/health/live'}


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0] not in PROBES):
        print(f'usage: python healthcheck.py [{"|".join(PROBES)}]', file=sys.stderr)
        return 2
    try:
        port = Settings.from_env().port
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    url = f'http://127.0.0.1:{port}{PROBES[argv[0] if argv else "ready"]}'
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f'{url}: {exc}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
