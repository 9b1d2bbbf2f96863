"""Two hosts on one machine: two network namespaces joined by a veth pair,
made with ``ip netns`` / ``ip link`` (iproute2) and removed afterwards.

Names are unique per pair (parallel tests never meet); the addresses are
the same in every pair (10.99.0.1 and 10.99.0.2/24), which is fine because
each pair's namespaces see only each other.  Deleting a namespace deletes
its end of the veth and with it the pair.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

ADDRESSES = ("10.99.0.1", "10.99.0.2")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


@dataclass
class NetnsPair:
    names: tuple[str, str]
    addresses: tuple[str, str] = ADDRESSES

    @classmethod
    def create(cls) -> NetnsPair:
        tag = os.urandom(4).hex()
        pair = cls((f"xmpA{tag}", f"xmpB{tag}"))
        veth = (f"xva{tag}", f"xvb{tag}")  # IFNAMSIZ: at most 15 characters
        try:
            for ns in pair.names:
                _ip("netns", "add", ns)
            _ip("link", "add", veth[0], "netns", pair.names[0], "type", "veth",
                "peer", "name", veth[1], "netns", pair.names[1])
            for ns, dev, addr in zip(pair.names, veth, pair.addresses, strict=True):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            pair.delete()
            raise
        return pair

    def run(self, i: int, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside namespace ``i``."""
        return subprocess.run(["ip", "netns", "exec", self.names[i], *cmd], **kw)

    def delete(self) -> None:
        for ns in self.names:
            if ns in namespaces():
                _ip("netns", "delete", ns)
