"""``id``, ``attenuate``, ``inspect`` and ``revoke``: identities and capabilities offline."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidCapability
from ..node import Node
from ..uri import (
    Capability,
    Caveat,
    Expires,
    Hint,
    Label,
    Peer,
    TcpHint,
    To,
    UnixHint,
    UnknownCaveat,
    Uses,
    ViaHint,
)
from .common import (
    CliError,
    Exit,
    busy_message,
    info,
    load_identity,
    lock_holder,
    read_capability,
    state_dir,
)

__all__ = ["cmd_attenuate", "cmd_id", "cmd_inspect", "cmd_revoke", "describe"]


def _emit(text: str) -> None:
    print(text, flush=True)


def cmd_id(args: argparse.Namespace) -> int:
    """Create (first time) or show this machine's identity."""
    directory = state_dir(args)
    key, created = load_identity(directory, create=True)
    assert key is not None
    if created:
        info(f"created a new identity in {directory / 'node.key'} (mode 0600)")
    if args.json:
        _emit(
            json.dumps(
                {
                    "node_id": str(key.node_id),
                    "state_dir": str(directory),
                    "key_file": str(directory / "node.key"),
                    "created": created,
                }
            )
        )
    else:
        _emit(str(key.node_id))
    return Exit.OK


def cmd_attenuate(args: argparse.Namespace) -> int:
    """Print a weaker capability (offline: no node is contacted)."""
    if args.ttl is None and args.uses is None and args.peer is None and args.label is None:
        raise CliError("nothing to add: give --ttl, --uses, --peer or --label", Exit.USAGE)
    cap = read_capability(args.uri)
    try:
        weaker = cap.attenuate(ttl=args.ttl, uses=args.uses, peer=args.peer, label=args.label)
    except InvalidCapability as exc:
        raise CliError(f"cannot attenuate: {exc}", Exit.USAGE) from None
    if args.json:
        _emit(json.dumps({"uri": str(weaker), **describe(weaker)}))
    else:
        _emit(str(weaker))
    return Exit.OK


def _when(at: int, now: float) -> str:
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = at - now
    span = _span(abs(delta))
    return f"{stamp} (in {span})" if delta > 0 else f"{stamp} (expired {span} ago)"


def _span(seconds: float) -> str:
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{round(seconds / 60)} min"
    if s < 172800:
        m = round(seconds / 60)
        return f"{m // 60} h {m % 60} min"
    return f"{round(seconds / 86400)} days"


def _caveat(c: Caveat, now: float) -> dict[str, Any]:
    match c:
        case Expires(at):
            return {
                "kind": "exp",
                "at": at,
                "expires": datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z"),
                "expired": now >= at,
            }
        case Uses(count):
            return {"kind": "uses", "count": count}
        case Peer(node):
            return {"kind": "peer", "node": str(node)}
        case To(node):
            return {"kind": "to", "node": str(node)}
        case Label(text):
            return {"kind": "label", "text": text}
        case UnknownCaveat(kind, value):
            return {"kind": kind, "unknown": True, "length": len(value)}
    raise AssertionError(f"unexpected caveat {c!r}")


def _hint(h: Hint, now: float) -> dict[str, Any]:
    if isinstance(h, TcpHint):
        return {"kind": "tcp", "host": h.host, "port": h.port}
    if isinstance(h, UnixHint):
        return {"kind": "unix", "path": h.path}
    if isinstance(h, ViaHint):
        return {"kind": "via", **describe(h.capability, now)}
    raise AssertionError(f"unexpected hint {h!r}")


def describe(cap: Capability, now: float | None = None) -> dict[str, Any]:
    """What a capability says, without its secret (no token, no tag)."""
    now = time.time() if now is None else now
    expiries = [c.at for c in cap.caveats if isinstance(c, Expires)]
    uses = [c.count for c in cap.caveats if isinstance(c, Uses)]
    peers = {str(c.node) for c in cap.caveats if isinstance(c, Peer)}
    return {
        "node": str(cap.node),
        "root_id": cap.root_id.hex(),
        "root": not cap.caveats,
        "caveats": [_caveat(c, now) for c in cap.caveats],
        "effective": {
            "expires": min(expiries) if expiries else None,
            "expired": bool(expiries) and now >= min(expiries),
            "uses": min(uses) if uses else None,
            "peers": sorted(peers),
            "usable": not any(isinstance(c, UnknownCaveat) for c in cap.caveats)
            and len(peers) <= 1
            and not (expiries and now >= min(expiries)),
        },
        "hints": [_hint(h, now) for h in cap.hints],
    }


def _text(cap: Capability, now: float, indent: str = "") -> list[str]:
    lines = [f"{indent}node      {cap.node}", f"{indent}root id   {cap.root_id.hex()} (public)"]
    if not cap.caveats:
        lines.append(f"{indent}caveats   none: a root capability, unrestricted")
    for i, c in enumerate(cap.caveats):
        head = "caveats  " if i == 0 else "         "
        match c:
            case Expires(at):
                text = f"expires {_when(at, now)}"
            case Uses(count):
                text = f"uses    at most {count} stream{'s' if count != 1 else ''}"
            case Peer(node):
                text = f"peer    only node {node}"
            case To(node):
                text = f"to      forwarding only to node {node}"
            case Label(label):
                text = f"label   {json.dumps(label, ensure_ascii=False)}"
            case UnknownCaveat(kind, value):
                text = f"kind {kind} ({len(value)} bytes): unknown to this version: refused"
        lines.append(f"{indent}{head} {i + 1}. {text}")
    if not cap.hints:
        lines.append(f"{indent}hints     none: reachable only over an existing session")
    for i, h in enumerate(cap.hints):
        head = "hints    " if i == 0 else "         "
        if isinstance(h, ViaHint):
            lines.append(f"{indent}{head} via a forwarding node:")
            lines.extend(_text(h.capability, now, indent + "            "))
        else:
            lines.append(f"{indent}{head} {h}")
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show what a capability says: node, caveats, hints.  Never its token or tag."""
    cap = read_capability(args.uri)
    now = time.time()
    if args.json:
        _emit(json.dumps(describe(cap, now)))
        return Exit.OK
    lines = _text(cap, now)
    eff = describe(cap, now)["effective"]
    if eff["expired"]:
        lines.append("status    expired: the endpoint refuses it")
    elif not eff["usable"]:
        lines.append("status    unusable: the endpoint refuses it")
    _emit("\n".join(lines))
    return Exit.OK


async def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a sturdy capability (and what was derived from it) in the state directory."""
    cap = read_capability(args.uri)
    directory = state_dir(args)
    pid = lock_holder(directory)
    if pid is not None:
        raise CliError(busy_message(directory, pid, "revoke"))
    key, _ = load_identity(directory, create=False)
    if key is None:
        raise CliError(
            f"there is no identity in {directory}: pass the --state-dir of the node "
            "that minted the capability"
        )
    if key.node_id != cap.node:
        raise CliError(
            f"the capability belongs to node {cap.node.short()}..., not to the identity "
            f"in {directory} ({key.node_id.short()}...): pass the --state-dir of the node "
            "that minted it; a temporary capability ends with the process that printed it"
        )
    node = Node(directory)
    try:
        await node.revoke(cap)
    except InvalidCapability:
        raise CliError(
            "this is not a sturdy capability of this node: only capabilities of named "
            "listeners (listen/share --name) outlive their process; a temporary one ends "
            "when you stop the process that printed it"
        ) from None
    finally:
        await node.aclose()
    if cap.caveats:
        info("revoked the capability; it is refused from the next start of the listener on")
    else:
        info(
            "revoked the root capability and everything derived from it; the next "
            "`listen --name`/`share --name` with this name prints a new one to hand out"
        )
    return Exit.OK
