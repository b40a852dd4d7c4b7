"""The embedded broker: kombu's filesystem transport with messages that appear whole.

Kombu writes a message into the shared folder in place (create, lock, write), while a
consumer lists the folder, moves a file out and reads it without taking the lock. A
consumer that lists the folder between the create and the write reads an empty or partial
message: the message is lost and the consumer's `json.loads` raises, which ends a Celery
worker. Here a message is written under a name no consumer takes and renamed into place,
and a rename within one folder is atomic.
"""

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps

# The suffix keeps a message out of `_get`, which takes only names ending in `.<queue>.msg`.
_PARTIAL = ".part"


class Channel(filesystem.Channel):
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + _PARTIAL
        try:
            with open(partial, "wb") as f:
                f.write(dumps(message).encode())  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


def broker_transport(broker_url: str) -> str | None:
    """The transport for a broker URL, where it is not the one kombu picks by its scheme."""
    return f"{__name__}:Transport" if broker_url.startswith("filesystem://") else None
