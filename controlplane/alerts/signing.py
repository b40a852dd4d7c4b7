"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

Every delivery carries `webhook-id`, `webhook-timestamp` and `webhook-signature`; the
signature lists one `v1,<base64 HMAC-SHA256>` per valid secret, so during a rotation a
receiver holding either the old or the new secret verifies it.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature_headers(
    *, webhook_id: str, timestamp: datetime, body: str, secrets: list[str]
) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": " ".join(
            Webhook(secret).sign(msg_id=webhook_id, timestamp=timestamp, data=body)
            for secret in secrets
        ),
    }
