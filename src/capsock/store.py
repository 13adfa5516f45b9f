"""The capability store and the endpoint's authorization check.

A store keeps, per root capability, the secret root key; it also counts uses
and remembers revocations.  :class:`MemoryStore` is the default (nothing
survives the process); :class:`SqliteStore` keeps named ("sturdy") roots, use
counters and revocations in an SQLite file (WAL, ``synchronous=FULL``: a use
is on disk before the stream is accepted).

:func:`authorize` is the whole decision an endpoint makes about a presented
token.  It does no ``await``: check-and-count of ``uses`` is atomic in the
event loop.  Work is uniform: an unknown root id is checked against a dummy
key with the same chain computation as a known one, and every failure returns
the same outcome to the caller (the specific reason is only for the local log).

Keys of the counters and revocations
------------------------------------
Every caveat position of a token has a *chain tag*: ``tags[0]`` is the root
tag, ``tags[i]`` the tag after the i-th caveat.  A revocation stores the tag of
the revoked capability, so it hits that capability and every capability
derived from it (their chains pass through it) and nothing else.  A ``uses``
counter is keyed by the chain tag right after its ``uses`` caveat, so every
attenuation of a ``uses=5`` capability shares its five uses.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .keys import NodeId
from .uri import Expires, Label, Peer, To, Token, UnknownCaveat, Uses, chain_tag, root_tag

__all__ = ["MemoryStore", "RootEntry", "SqliteStore", "Store", "Verdict", "authorize", "chain"]


@dataclass(slots=True)
class RootEntry:
    """One root capability of this node."""

    root_id: bytes
    """Public 16-byte identifier carried in every token derived from the root."""
    root_key: bytes = field(repr=False)
    """The 32-byte secret from which every tag of the root is derived."""
    name: str | None = None
    """The sturdy name given to :meth:`capsock.Node.listen` (None: temporary)."""


class Store(Protocol):
    """What :func:`authorize` and :class:`capsock.Node` need from a store."""

    def add_root(self, entry: RootEntry) -> None: ...
    def remove_root(self, root_id: bytes) -> None: ...
    def get_root(self, root_id: bytes) -> RootEntry | None: ...
    def root_by_name(self, name: str) -> RootEntry | None: ...
    def revoke(self, tag: bytes, root_id: bytes) -> None: ...
    def is_revoked(self, tags: list[bytes]) -> bool: ...
    def uses(self, key: bytes) -> int: ...
    def add_uses(self, keys: list[bytes], root_id: bytes) -> None: ...
    def close(self) -> None: ...


class MemoryStore:
    """Roots, use counters and revocations, in memory."""

    def __init__(self) -> None:
        self._roots: dict[bytes, RootEntry] = {}
        self._names: dict[str, bytes] = {}
        self._uses: dict[bytes, int] = {}
        self._revoked: set[bytes] = set()
        # What each root owns, so that forgetting a root frees it all: a node
        # that mints temporary sockets all day must not grow without bound.
        self._root_uses: dict[bytes, set[bytes]] = {}
        self._root_revoked: dict[bytes, set[bytes]] = {}

    def add_root(self, entry: RootEntry) -> None:
        self._roots[entry.root_id] = entry
        if entry.name is not None:
            self._names[entry.name] = entry.root_id

    def remove_root(self, root_id: bytes) -> None:
        """Forget a root with its counters and revocations (its tokens are now
        refused as unknown, and a root id is never reused)."""
        entry = self._roots.pop(root_id, None)
        if entry is not None and entry.name is not None:
            self._names.pop(entry.name, None)
        for key in self._root_uses.pop(root_id, ()):
            self._uses.pop(key, None)
        self._revoked.difference_update(self._root_revoked.pop(root_id, ()))

    def sizes(self) -> dict[str, int]:
        """How many roots, counters and revocations are held (for tests and stats)."""
        return {"roots": len(self._roots), "uses": len(self._uses), "revoked": len(self._revoked)}

    def get_root(self, root_id: bytes) -> RootEntry | None:
        return self._roots.get(root_id)

    def root_by_name(self, name: str) -> RootEntry | None:
        rid = self._names.get(name)
        return None if rid is None else self._roots.get(rid)

    def revoke(self, tag: bytes, root_id: bytes) -> None:
        self._revoked.add(tag)
        self._root_revoked.setdefault(root_id, set()).add(tag)

    def is_revoked(self, tags: list[bytes]) -> bool:
        return any(t in self._revoked for t in tags)

    def uses(self, key: bytes) -> int:
        return self._uses.get(key, 0)

    def add_uses(self, keys: list[bytes], root_id: bytes) -> None:
        owned = self._root_uses.setdefault(root_id, set())
        for key in keys:
            self._uses[key] = self._uses.get(key, 0) + 1
            owned.add(key)

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS roots (
    root_id BLOB PRIMARY KEY, root_key BLOB NOT NULL, name TEXT UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS uses (
    key BLOB PRIMARY KEY, root_id BLOB NOT NULL, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked (
    tag BLOB PRIMARY KEY, root_id BLOB NOT NULL, at REAL NOT NULL);
"""


class SqliteStore:
    """Sturdy roots, use counters and revocations in one SQLite file.

    Only *named* roots survive a restart; temporary roots (``mint``, unnamed
    ``listen``) are kept in memory and their counters and revocations are
    dropped with them.  One store file belongs to one process: the node holds
    a lock file next to it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # The file holds root keys: create it 0600 (SQLite gives its -wal and
        # -shm files the same mode).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._memory = MemoryStore()  # temporary roots

    def _persistent(self, root_id: bytes) -> bool:
        return self._memory.get_root(root_id) is None

    def add_root(self, entry: RootEntry) -> None:
        if entry.name is None:
            self._memory.add_root(entry)
            return
        self._db.execute(
            "INSERT INTO roots (root_id, root_key, name, created) VALUES (?, ?, ?, ?)",
            (entry.root_id, entry.root_key, entry.name, time.time()),
        )

    def remove_root(self, root_id: bytes) -> None:
        """Forget a root with its counters and revocations."""
        if not self._persistent(root_id):
            self._memory.remove_root(root_id)
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for table in ("roots", "uses", "revoked"):
                self._db.execute(f"DELETE FROM {table} WHERE root_id = ?", (root_id,))  # noqa: S608

    def get_root(self, root_id: bytes) -> RootEntry | None:
        entry = self._memory.get_root(root_id)
        if entry is not None:
            return entry
        row = self._db.execute(
            "SELECT root_key, name FROM roots WHERE root_id = ?", (root_id,)
        ).fetchone()
        return None if row is None else RootEntry(root_id, bytes(row[0]), row[1])

    def root_by_name(self, name: str) -> RootEntry | None:
        row = self._db.execute(
            "SELECT root_id, root_key FROM roots WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else RootEntry(bytes(row[0]), bytes(row[1]), name)

    def revoke(self, tag: bytes, root_id: bytes) -> None:
        if not self._persistent(root_id):
            self._memory.revoke(tag, root_id)
            return
        self._db.execute(
            "INSERT OR IGNORE INTO revoked (tag, root_id, at) VALUES (?, ?, ?)",
            (tag, root_id, time.time()),
        )

    def is_revoked(self, tags: list[bytes]) -> bool:
        if self._memory.is_revoked(tags):
            return True
        marks = ",".join("?" * len(tags))
        row = self._db.execute(f"SELECT 1 FROM revoked WHERE tag IN ({marks})", tags).fetchone()  # noqa: S608 - placeholders only
        return row is not None

    def uses(self, key: bytes) -> int:
        count = self._memory.uses(key)
        row = self._db.execute("SELECT count FROM uses WHERE key = ?", (key,)).fetchone()
        return count + (int(row[0]) if row else 0)

    def add_uses(self, keys: list[bytes], root_id: bytes) -> None:
        if not self._persistent(root_id):
            self._memory.add_uses(keys, root_id)
            return
        with self._db:  # one durable transaction before the ACCEPT goes out
            self._db.execute("BEGIN IMMEDIATE")
            for key in keys:
                self._db.execute(
                    "INSERT INTO uses (key, root_id, count) VALUES (?, ?, 1) "
                    "ON CONFLICT(key) DO UPDATE SET count = count + 1",
                    (key, root_id),
                )

    def close(self) -> None:
        self._db.close()


_DUMMY_KEY = os.urandom(32)


def chain(root_key: bytes, token: Token) -> list[bytes]:
    """The chain tags of ``token`` computed from ``root_key`` (see the module doc):
    ``tag_0`` (the root's) first, the token's own tag last if it is authentic.

    The one implementation of the whole chain (:mod:`capsock.uri` holds its two
    steps, :func:`~capsock.uri.root_tag` and :func:`~capsock.uri.chain_tag`).

    Raises:
        LocalUsageError: ``root_key`` is not 32 bytes.
    """
    tag = root_tag(root_key, token.root_id)
    tags = [tag]
    for caveat in token.caveats:
        tag = chain_tag(tag, caveat)
        tags.append(tag)
    return tags


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`authorize`."""

    reason: str | None
    """None when allowed, else why not (for the local log only)."""
    tags: tuple[bytes, ...] = field(default=(), repr=False)
    """The token's chain tags when allowed (to find streams to reset on revocation)."""
    uses_key: bytes | None = field(default=None, repr=False)
    """The counter key of the token's *first* ``uses`` caveat, if any."""

    @property
    def allowed(self) -> bool:
        return self.reason is None


def authorize(
    store: Store, token: Token, *, peer: NodeId, now: float, consume: bool = True
) -> Verdict:
    """Decide whether ``peer`` may open a stream with ``token``; count the use if so.

    With ``consume=False`` the decision is made (with the same work) but no
    use is counted.
    """
    for caveat in token.caveats:
        if type(caveat) is UnknownCaveat:
            # A property of the token alone (no capsock node mints one), so
            # refusing it before any hashing says nothing about our roots.
            return Verdict(f"unknown caveat kind {caveat.kind}")
    entry = store.get_root(token.root_id)
    tags = chain(entry.root_key if entry is not None else _DUMMY_KEY, token)
    tag_ok = hmac.compare_digest(tags[-1], token.tag)
    if entry is None:
        return Verdict("unknown root")
    if not tag_ok:
        return Verdict("bad tag")
    if store.is_revoked(tags):
        return Verdict("revoked")
    counters: list[tuple[bytes, int]] = []
    for caveat, after in zip(token.caveats, tags[1:], strict=True):
        match caveat:
            case Expires(at):
                if now >= at:
                    return Verdict("expired")
            case Peer(node):
                # Either spelling of the key (an id or its twin, keys.NodeId.twin):
                # only the key's holder can present either, so both are one peer.
                if node != peer and node.twin() != peer:
                    return Verdict("bound to another peer")
            case Uses(count):
                counters.append((after, count))
            case Label() | To():
                pass  # To restricts forwarding targets: the forwarder checks it
            case UnknownCaveat(kind):
                return Verdict(f"unknown caveat kind {kind}")
    if any(store.uses(key) >= limit for key, limit in counters):
        return Verdict("used up")
    if consume and counters:
        store.add_uses([key for key, _ in counters], token.root_id)
    return Verdict(None, tuple(tags), counters[0][0] if counters else None)
