"""The plug-in point every hardware collector implements."""

from __future__ import annotations

from typing import Protocol, TypeVar

_Facts_co = TypeVar("_Facts_co", covariant=True)


class Collector(Protocol[_Facts_co]):
    """Reports one kind of hardware; absent hardware yields empty facts, never an exception.

    Collectors are objects with `collect()` (as in prometheus client_python) so the agent can
    run them on a schedule and tests can swap the roots they read.
    """

    @property
    def name(self) -> str: ...

    def collect(self) -> _Facts_co: ...
