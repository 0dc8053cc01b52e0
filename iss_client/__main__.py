"""``python -m iss_client``: the ``iss-client`` command."""

import sys

from iss_client.command import main

sys.exit(main())
