"""What test_contract.py's schemathesis run is told in code, where schemathesis.toml cannot say it.

Loaded by schemathesis through ``SCHEMATHESIS_HOOKS=schemathesis_hooks``; nothing else imports it.
"""

import schemathesis

# NOTE: a tus chunk is plain bytes under tus's own media type (PATCH /uploads/{upload_id}).
schemathesis.serializer.alias('application/offset+octet-stream', 'application/octet-stream')
