"""The embedded broker's messages appear in its folder whole: a consumer that lists the
folder while a message is being written must not take it half-written (the message would
be lost and the consumer's JSON decoding would end its Celery worker)."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection

from agent.broker import broker_transport
from agent.protocol import broker_transport_options


class _FolderWatch:
    """Part of a message's payload: what the folder holds while the message is serialised,
    the step between creating its file and writing it whole."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[str] | None = None

    def __json__(self) -> str:
        self.seen = sorted(p.name for p in self.folder.iterdir() if p.is_file())
        return "written"


def test_a_message_is_not_visible_until_it_is_written_whole(tmp_path: Path) -> None:
    url = f"filesystem://localhost{tmp_path}"
    watch = _FolderWatch(tmp_path)
    with Connection(
        url, transport=broker_transport(url), transport_options=broker_transport_options(url)
    ) as connection:
        channel = connection.default_channel
        channel._put("jobs", {"body": watch})
        assert watch.seen is not None and not [n for n in watch.seen if n.endswith(".msg")]
        assert channel._get("jobs") == {"body": "written"}
    assert not [p for p in tmp_path.iterdir() if p.is_file()], "the message was left behind"


def test_only_the_filesystem_broker_is_replaced() -> None:
    assert broker_transport("filesystem://localhost/tmp/broker") == "agent.broker:Transport"
    assert broker_transport("redis://broker.example/0") is None
