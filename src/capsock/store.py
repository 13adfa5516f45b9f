"""The capability store and the endpoint's authorization check.

A store keeps, per root capability, the secret root key; it also counts uses
and remembers revocations.  :class:`MemoryStore` is the default (nothing
survives the process).  :func:`authorize` is the whole decision an endpoint
makes about a presented token, and it makes it without I/O so that the
check-and-count of ``uses`` is atomic.

Work is uniform: an unknown root id is checked against a dummy key with the
same chain computation as a known one, and every failure returns the same
outcome to the caller (the specific reason is only for the local log).
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

from .keys import NodeId
from .uri import Expires, Label, Peer, Token, UnknownCaveat, Uses, chain_tag, root_tag

__all__ = ["MemoryStore", "RootEntry", "authorize"]


@dataclass(slots=True)
class RootEntry:
    """One root capability of this node."""

    root_id: bytes
    """Public 16-byte identifier carried in every token derived from the root."""
    root_key: bytes = field(repr=False)
    """The 32-byte secret from which every tag of the root is derived."""
    name: str | None = None
    """The sturdy name given to :meth:`capsock.Node.listen`, if any."""


class MemoryStore:
    """Roots, use counters and revocations, in memory."""

    def __init__(self) -> None:
        self._roots: dict[bytes, RootEntry] = {}
        self._names: dict[str, bytes] = {}
        self._uses: dict[bytes, int] = {}
        self._revoked: set[bytes] = set()

    def add_root(self, entry: RootEntry) -> None:
        self._roots[entry.root_id] = entry
        if entry.name is not None:
            self._names[entry.name] = entry.root_id

    def get_root(self, root_id: bytes) -> RootEntry | None:
        return self._roots.get(root_id)

    def root_by_name(self, name: str) -> RootEntry | None:
        rid = self._names.get(name)
        return None if rid is None else self._roots.get(rid)

    def revoke(self, tag: bytes) -> None:
        """Revoke the capability whose tag is ``tag`` and everything derived from it."""
        self._revoked.add(tag)

    def is_revoked(self, tag: bytes) -> bool:
        return tag in self._revoked

    def uses(self, key: bytes) -> int:
        return self._uses.get(key, 0)

    def add_use(self, key: bytes) -> None:
        self._uses[key] = self._uses.get(key, 0) + 1


_DUMMY_KEY = os.urandom(32)


def authorize(
    store: MemoryStore, token: Token, *, peer: NodeId, now: float, consume: bool = True
) -> str | None:
    """Decide whether ``peer`` may open a stream with ``token``; count the use if so.

    With ``consume=False`` the decision is made (with the same work) but no
    use is counted.

    Returns None when allowed, else the reason (for the local log only: the
    wire answer is the same for every reason).
    """
    entry = store.get_root(token.root_id)
    key = entry.root_key if entry is not None else _DUMMY_KEY
    tag = root_tag(key, token.root_id)
    chain = [tag]
    for caveat in token.caveats:
        tag = chain_tag(tag, caveat)
        chain.append(tag)
    tag_ok = hmac.compare_digest(tag, token.tag)
    if entry is None:
        return "unknown root"
    if not tag_ok:
        return "bad tag"
    if any(store.is_revoked(t) for t in chain):
        return "revoked"
    counters: list[tuple[bytes, int]] = []
    for caveat, after in zip(token.caveats, chain[1:], strict=True):
        match caveat:
            case Expires(at):
                if now >= at:
                    return "expired"
            case Peer(node):
                if node != peer:
                    return "bound to another peer"
            case Uses(count):
                counters.append((after, count))
            case Label():
                pass
            case UnknownCaveat(kind):
                return f"unknown caveat kind {kind}"
    if any(store.uses(k) >= limit for k, limit in counters):
        return "used up"
    if consume:
        for k, _ in counters:
            store.add_use(k)
    return None
