"""A result the toolstack gives later: an operation that waits for
xenstore (a hot-plug that must be written, a detach that waits for the
guest) returns a :class:`Pending`, and the control socket answers its
client when it settles -- the loop never waits inline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xmp.errors import HypercallError


class Pending:
    def __init__(self) -> None:
        self._settled: tuple[dict[str, Any] | None, HypercallError | None] | None = None
        self._then: list[Callable[[dict[str, Any] | None, HypercallError | None], None]] = []

    def resolve(self, result: dict[str, Any]) -> None:
        self._settle(result, None)

    def fail(self, exc: HypercallError) -> None:
        self._settle(None, exc)

    def _settle(self, result, exc) -> None:
        if self._settled is not None:
            return  # the first word stands (a timeout racing an answer)
        self._settled = (result, exc)
        for fn in self._then:
            fn(result, exc)
        self._then.clear()

    def then(self, fn: Callable[[dict[str, Any] | None, HypercallError | None], None]) -> None:
        if self._settled is not None:
            fn(*self._settled)
        else:
            self._then.append(fn)

    @property
    def done(self) -> bool:
        return self._settled is not None
