"""Tests that kill surviving mutants of store.py (scripts/mutation store; docs/testing.md)."""

from __future__ import annotations

import os

import pytest

import capsock.uri._token
from capsock.keys import KeyPair
from capsock.store import MemoryStore, RootEntry, authorize
from capsock.uri import Label, Token, UnknownCaveat, mint_root

ROOT_KEY, ROOT_ID = bytes(range(32)), bytes(range(16))
PEER = KeyPair(bytes(32)).node_id


@pytest.mark.parametrize("root", ["known", "unknown", "forged"])
def test_an_unknown_caveat_is_refused_before_any_root_is_looked_at(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills ``authorize`` 2 (the early refusal skipped): a token with an
    unknown caveat is refused as such, with no hashing, whether its root is
    ours, unknown, or its tag forged; so that refusal says nothing about the
    store's roots (without the early check it said "unknown root" / "bad tag")."""
    store = MemoryStore()
    store.add_root(RootEntry(ROOT_ID, ROOT_KEY))
    key, rid = (ROOT_KEY, ROOT_ID) if root != "unknown" else (os.urandom(32), os.urandom(16))
    token = mint_root(key, rid).attenuate(Label("a"), UnknownCaveat(200, b"new"))
    if root == "forged":
        token = Token(token.root_id, token.caveats, bytes(32))
    hashed = []
    real = capsock.uri._token._blake2b
    monkeypatch.setattr(capsock.uri._token, "_blake2b", lambda *a: hashed.append(1) or real(*a))
    verdict = authorize(store, token, peer=PEER, now=0.0)
    assert not verdict.allowed
    assert verdict.reason == "unknown caveat kind 200"
    assert hashed == []
