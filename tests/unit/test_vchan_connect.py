"""vchan's client_init before the server has announced: a guest reading
under another guest's tree is answered EACCES (xenstored does not say what
exists there), which is "not yet", as ENOENT is, until the timeout."""

from __future__ import annotations

import pytest

from xmp.errors import RemoteProtocolError, XenStoreError
from xmp.libs import vchan


class Store:
    def __init__(self, answers: list):
        self.answers = answers
        self.reads = 0

    def read_or(self, path: str):
        self.reads += 1
        answer = self.answers[min(self.reads, len(self.answers)) - 1]
        if isinstance(answer, str) and answer.startswith("E"):
            raise XenStoreError(answer, path, "read")
        return answer


class Kernel:
    domid = 2

    def __init__(self, store: Store):
        self.xenstore = store

    def sleep(self, _seconds: float) -> None:
        pass


def test_refused_reads_are_waited_through_until_the_entries_appear():
    store = Store(["EACCES", "EACCES", b"x", b"y"])
    with pytest.raises(RemoteProtocolError, match="are not numbers"):  # it read them, past the refusals
        vchan.client_init(Kernel(store), 1, "/local/domain/1/data/v", timeout=30)
    assert store.reads == 4


def test_still_refused_at_the_timeout_raises_the_refusal():
    with pytest.raises(XenStoreError) as err:
        vchan.client_init(Kernel(Store(["EACCES"])), 1, "/local/domain/1/data/v", timeout=0.01)
    assert err.value.errno == "EACCES"


def test_other_errors_are_not_waited_through():
    store = Store(["EINVAL"])
    with pytest.raises(XenStoreError) as err:
        vchan.client_init(Kernel(store), 1, "/local/domain/1/data/v", timeout=30)
    assert err.value.errno == "EINVAL" and store.reads == 1
