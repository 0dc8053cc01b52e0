"""Container health check: exit 0 when ISS's /health answers 200, else 1.

The slim Python image has no curl, so the Dockerfile's HEALTHCHECK and the
compose healthcheck run this, with the standard library only (and ISS's own
configuration, which needs no more)::

    python healthcheck.py            # http://127.0.0.1:$ISS_PORT/health
"""

import sys
import urllib.error
import urllib.request

from iss_server.config import ConfigError, Settings


def main() -> int:
    try:
        port = Settings.from_env().port
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    url = f'http://127.0.0.1:{port}/health'
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f'{url}: {exc}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
