"""What the commands share: exit codes, messages, identities, nodes, capability arguments.

Conventions: stdout carries only data (a stream's bytes, a received file with
``-o -``, or the requested output of ``id``, ``inspect``, ``attenuate`` and
``completion``); every message goes to stderr, one line each, errors as
``capsock: error: WHAT HAPPENED; WHAT TO DO``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio

from .. import statedir
from ..errors import ErrorCode, InvalidCapability, LocalUsageError, PeerAuthenticationError
from ..keys import KeyPair, NodeId
from ..net.stream import Stream
from ..node import Listener, Node, NodeConfig
from ..uri import Capability, Expires, Peer, TcpHint, UnixHint, ViaHint
from .output import CliError, Exit, bar_drawn, info, quiet, say, set_quiet

__all__ = [
    "CliError",
    "Exit",
    "announce",
    "bar_drawn",
    "check_before_dialing",
    "dialing_node",
    "info",
    "listening_node",
    "load_identity",
    "lock_holder",
    "make_listener",
    "parse_duration",
    "parse_node_id",
    "quiet",
    "read_capability",
    "relays_settled",
    "resetting",
    "say",
    "set_quiet",
    "state_dir",
    "state_home",
    "uri_argument",
]


# ------------------------------------------------------------------ argument types

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` -> seconds (argparse type)."""
    match = _DURATION.fullmatch(text.strip())
    seconds = float(match.group(1)) * _UNIT[match.group(2)] if match else 0.0
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use seconds or a number with s, m, h or d (e.g. 15m)"
        )
    return seconds


def parse_uses(text: str) -> int:
    """A positive number of uses (argparse type)."""
    if not text.isdigit() or not 1 <= int(text) <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of uses (1 or more)")
    return int(text)


def parse_node_id(text: str) -> NodeId:
    """A 52-character node id, as ``capsock id`` prints it (argparse type)."""
    try:
        return NodeId.parse(text.strip())
    except InvalidCapability as exc:
        raise argparse.ArgumentTypeError(f"{exc}; `capsock id` prints one") from None


def uri_argument(text: str) -> str:
    """The argparse ``type`` of every URI-valued option and positional.

    The value is kept as given (the URI, ``-`` or ``@FILE``) and read by
    :func:`read_capability` when the command runs; ``capsock.cli.app`` refuses
    a command line with more than one ``-`` among these arguments.
    """
    return text


def read_capability(text: str, *, stdin_ok: bool = True, what: str = "") -> Capability:
    """A capability from the command line: the URI, ``-`` (read stdin) or ``@FILE``.

    Raises:
        CliError: unreadable source or malformed URI (exit code 2).
    """
    source = "the argument"
    if text == "-":
        if not stdin_ok:
            raise CliError(
                "this command's stdin carries data: pass the URI as an argument or as @FILE",
                Exit.USAGE,
            )
        text = sys.stdin.readline()
        source = "stdin"
    elif text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise CliError(
                f"{what}cannot read the capability from {source}: {why}", Exit.USAGE
            ) from None
    text = text.strip()
    try:
        cap = Capability.parse(text)
    except InvalidCapability as exc:
        cut = _looks_cut(text, str(exc))
        raise CliError(
            f"{what}{source} is not a capsock:// capability ({exc}); "
            + (f"{cut}; " if cut else "")
            + "copy the whole URI, or pass - to read it from stdin or @FILE to read it "
            "from a file",
            Exit.USAGE,
        ) from None
    damaged = _damaged_node(cap)
    if damaged is not None:
        raise CliError(f"{what}{source}: {damaged}", Exit.USAGE)
    return cap


def _looks_cut(text: str, error: str) -> str | None:
    """Advice when a malformed URI looks like a paste cut short, else None."""
    cut = ("truncated", "empty", "padding", "missing")
    if text.endswith(("?", "&", "=")) or any(word in error for word in cut):
        return "it looks cut short (a line break or a paste that stopped early?)"
    return None


def _damaged_node(cap: Capability) -> str | None:
    """Why a node id in ``cap`` (or in one of its via hints) cannot be anyone's key.

    Such an id parses (it is canonical base32) but is no Ed25519 point: a
    changed character, not an unreachable node, so it is a malformed URI."""
    try:
        cap.node.x25519()
    except PeerAuthenticationError as exc:
        return str(exc)
    for hint in cap.hints:
        if isinstance(hint, ViaHint):
            inner = _damaged_node(hint.capability)
            if inner is not None:
                return inner
    return None


# ------------------------------------------------------------------ identity and state


def state_home() -> Path:
    """The user's capsock state directory ($XDG_STATE_HOME/capsock, ~/.local/state/capsock)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "capsock"


def state_dir(args: argparse.Namespace) -> Path:
    """``--state-dir`` or the default."""
    given: Path | None = getattr(args, "state_dir", None)
    return given if given is not None else state_home()


def lock_holder(directory: Path) -> str | None:
    """The pid (text) of the process holding ``directory``'s node lock, or None if free."""
    return statedir.lock_holder(directory)


def busy_message(directory: Path, pid: str, doing: str) -> str:
    return (
        f"cannot {doing}: the state directory {directory} is in use by another capsock "
        f"process (pid {pid}); stop it first, or pass another --state-dir"
    )


def load_identity(directory: Path, *, create: bool) -> tuple[KeyPair | None, bool]:
    """The identity key in ``directory`` (and whether it was just created).

    Without ``create``, a missing key gives ``(None, False)`` and nothing is written.
    """
    path = directory / "node.key"
    try:
        if not create:
            return KeyPair.load(path), False
        statedir.prepare(directory)
        try:
            return KeyPair.load(path), False
        except FileNotFoundError:
            pass
        try:
            fd = statedir.lock(directory)
        except LocalUsageError:
            if statedir.lock_holder(directory) is None:
                raise  # not busy: the lock file itself is wrong (a link, another's)
            # The holder is a running node: it creates the key right after locking.
            # Either way, reading is all that is left to do.
            try:
                return KeyPair.load(path), False
            except FileNotFoundError:
                raise CliError(
                    f"the state directory {directory} is being set up by another capsock "
                    "process; run this again in a moment"
                ) from None
        try:
            try:
                return KeyPair.load(path), False
            except FileNotFoundError:
                return KeyPair.load_or_create(path), True
        finally:
            statedir.unlock(fd)
    except FileNotFoundError:
        return None, False
    except LocalUsageError as exc:
        raise CliError(str(exc)) from None


def dialing_node(args: argparse.Namespace, target: Capability) -> Node:
    """A node that only dials: this machine's identity if there is one, else a fresh one.

    The identity key is read, never created, and the state directory is not
    locked: dialing commands run next to a listening one.  Dialing one's own
    identity is impossible, so a capability of this very identity is dialed
    with a fresh key.
    """
    key: KeyPair | None = None
    who = "a fresh identity (--ephemeral)"
    if not args.ephemeral:
        key, _ = load_identity(state_dir(args), create=False)
        who = f"a fresh identity (there is none in {state_dir(args)})"
        if key is not None and key.node_id == target.node:
            key = None
            who = "a fresh identity (the capability names this machine's own)"
        elif key is not None:
            who = f"the identity in {state_dir(args)} ({key.node_id.short()}...)"
    if key is None:
        key = KeyPair.generate()
    check_before_dialing(target, key.node_id, who)
    return Node(key=key, config=_direct_config(args))


def _direct_config(args: argparse.Namespace) -> NodeConfig | None:
    return NodeConfig(direct_paths=False) if getattr(args, "no_direct", False) else None


_NO_DIRECT = "stay on the relay: do not try a direct path (hole punching) to peers reached through one, and send them no addresses"  # noqa: E501


def check_before_dialing(cap: Capability, me: NodeId, who: str = "this identity") -> None:
    """Refuse locally what the endpoint would refuse anyway, before anything is dialed.

    An expired capability (by this machine's clock), one bound (``peer``) to
    another node than ``me``, the identity this command dials with (``who``
    says which, in words), and one without route hints (a URI cut short at
    ``?``) cannot work.  The endpoint's refusal would not say why (that is
    deliberate); the holder can.

    Raises:
        CliError: exit code 4 (expired, another peer) or 2 (no route hints).
    """
    now = time.time()
    expiries = [c.at for c in cap.caveats if isinstance(c, Expires)]
    if expiries and now >= min(expiries):
        when = datetime.fromtimestamp(min(expiries), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise CliError(
            f"refused here, nothing was dialed: the capability expired at {when} (by this "
            "machine's clock); ask whoever gave it to you for a new one",
            Exit.REFUSED,
        )
    peers = {c.node for c in cap.caveats if isinstance(c, Peer)}
    if len(peers) > 1:
        raise CliError(
            "refused here, nothing was dialed: the capability is bound to two different "
            "nodes (peer caveats), so no node can use it; ask for a new one",
            Exit.REFUSED,
        )
    if peers and me not in peers:
        (bound,) = peers
        raise CliError(
            f"refused here, nothing was dialed: the capability is bound to node "
            f"{bound.short()}..., but this command dials with {who}; pass the --state-dir "
            "of that node's identity, or ask for a capability bound to yours (`capsock id`)",
            Exit.REFUSED,
        )
    if not cap.hints:
        raise CliError(
            "the capability carries no route hints (?tcp=... or ?via=...), so there is "
            "no way to reach its node: it looks cut short; copy the whole URI",
            Exit.USAGE,
        )


@asynccontextmanager
async def listening_node(
    args: argparse.Namespace, *, stdin_is_data: bool = False
) -> AsyncIterator[Node]:
    """The node of a listening command (``listen``, ``share``, ``send``).

    With ``--name``, the state directory's identity and store (locked for the
    node's lifetime), so the capability is sturdy and revocable; otherwise a
    fresh identity that lives as long as the process.  Default address:
    ``tcp:127.0.0.1:0``, none when relays are given.
    """
    relays = [
        read_capability(r, stdin_ok=not stdin_is_data, what="--relay: ") for r in args.relay or ()
    ]
    name = getattr(args, "name", None)
    directory = state_dir(args) if name else None
    if directory is not None:
        pid = lock_holder(directory)
        if pid is not None:
            raise CliError(busy_message(directory, pid, f"serve the sturdy name {name!r}"))
    listen = args.listen or ([] if args.relay else ["tcp:127.0.0.1:0"])
    if name and not args.listen and not args.relay:
        info(
            f"warning: --name {name!r} keeps the capability's secret across restarts, but "
            "its address is a random port: pass --listen HOST:PORT (or --relay) so that "
            "the URI still reaches this node after a restart"
        )
    try:
        node = Node(
            directory,
            listen=[_listen_spec(s) for s in listen],
            advertise=[_listen_spec(s) for s in args.advertise] if args.advertise else None,
            relays=relays,
            config=_direct_config(args),
        )
    except LocalUsageError as exc:
        raise CliError(str(exc), Exit.USAGE) from None
    for relay in relays:  # the node dials its relays: the same checks as a dialing command
        who = f"this node's identity ({node.id.short()}...)"
        try:
            check_before_dialing(relay, node.id, who)
        except CliError as exc:
            await node.aclose()
            raise CliError(f"--relay: {exc}", exc.code) from None
    async with node:
        if not relays:
            yield node
            return
        names = {r.redacted(): f"relay {r.node.short()}..." for r in relays}
        await _wait_for_relays(node, names, getattr(args, "timeout", None))
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_relays, node, names)
            try:
                yield node
            finally:
                tg.cancel_scope.cancel()


def _listen_spec(text: str) -> str:
    """``tcp:HOST:PORT``, ``unix:/PATH``; a bare ``HOST:PORT`` means tcp."""
    if text.startswith(("tcp:", "unix:")):
        return text
    return f"tcp:{text}"


def _settled(status: str) -> bool:
    return status == "registered" or status.startswith("refused")


async def relays_settled(node: Node, expected: int) -> dict[str, str]:
    """Wait until each of the node's ``expected`` relays is registered or refused;
    the relay statuses then (redacted relay URI -> status).

    The one place the CLI waits for relays: it polls ``Node.relay_status``
    today, and can become an ``await node.wait_registered()`` without the
    commands changing.  No deadline of its own: put one around it.
    """
    while len(node.relay_status) < expected or not all(  # noqa: ASYNC110
        _settled(s) for s in node.relay_status.values()
    ):
        await anyio.sleep(0.05)
    return dict(node.relay_status)


_SAY_WAITING_AFTER = 1.0
_WAIT_WITHOUT_TIMEOUT = 15.0


async def _wait_for_relays(node: Node, names: dict[str, str], give_up: float | None = None) -> None:
    """Wait for the relays: say so when it takes more than a moment; with
    ``give_up`` (``--timeout``) fail after it (exit code 5), without it
    hand out the capability after 15 s and keep trying in the background."""
    with anyio.move_on_after(_SAY_WAITING_AFTER):
        await relays_settled(node, len(names))
    unsettled = {k: s for k, s in node.relay_status.items() if not _settled(s)}
    if unsettled or len(node.relay_status) < len(names):
        for relay in names:
            status = node.relay_status.get(relay, "connecting")
            if _settled(status):
                continue
            until = (
                f"up to {give_up:g} s (--timeout)"
                if give_up is not None
                else f"{_WAIT_WITHOUT_TIMEOUT:g} s, then the capability is handed out "
                "anyway (--timeout N to give up instead)"
            )
            info(f"waiting for {names[relay]} ({status}): {until}; Ctrl-C to stop")
        limit = give_up if give_up is not None else _WAIT_WITHOUT_TIMEOUT
        with anyio.move_on_after(max(limit - _SAY_WAITING_AFTER, 0.0)):
            await relays_settled(node, len(names))
    for relay, status in node.relay_status.items():
        name = names.get(relay, "the relay")
        if status.startswith("refused"):
            raise CliError(
                f"the relay refused the capability {relay}; ask the relay's operator "
                "for a current one",
                Exit.REFUSED,
            )
        if status == "registered":
            info(f"registered with {name}: reachable through it")
        elif give_up is not None:
            raise CliError(
                f"{name} was not reachable within {give_up:g} s ({status}); check that the "
                "relay runs and that its address in --relay is right, or wait longer "
                "with a larger --timeout",
                Exit.UNREACHABLE,
            )
        else:
            info(f"warning: {name} is not reachable yet ({status}); still trying")


async def _watch_relays(node: Node, names: dict[str, str], period: float = 0.1) -> None:
    """Say (at the default level) when a relay registration comes back after a loss.

    The node itself warns when it loses a relay; without this line the user
    would never learn that the URI works again."""
    seen = dict(node.relay_status)
    while True:
        await anyio.sleep(period)
        for relay, status in list(node.relay_status.items()):
            before = seen.get(relay)
            if status == "registered" and before != "registered":
                info(f"registered again with {names.get(relay, 'the relay')}: reachable again")
        seen = dict(node.relay_status)


async def make_listener(
    node: Node, args: argparse.Namespace, *, uses: int | None = None
) -> tuple[Listener, Capability]:
    """The listener of a listening command and the capability to hand out.

    With caveats (``--ttl/--uses/--peer/--label``) and no ``--name``: a fresh
    temporary listener (``Node.mint``) that retires when its capability is
    used up or expired.  With ``--name``: the sturdy listener, and its
    capability attenuated with the caveats.  Otherwise a fresh root listener.
    """
    caveats = {
        "ttl": args.ttl,
        "uses": args.uses if args.uses is not None else uses,
        "peer": args.peer,
        "label": args.label,
    }
    restricted = any(v is not None for v in caveats.values())
    name = getattr(args, "name", None)
    if name:
        listener = await node.listen(name)
        cap = listener.uri.attenuate(**caveats) if restricted else listener.uri
        return listener, cap
    if restricted:
        listener = await node.mint(**caveats)
        return listener, listener.uri
    listener = await node.listen()
    return listener, listener.uri


@asynccontextmanager
async def resetting(stream: Stream) -> AsyncIterator[Stream]:
    """Close ``stream`` at the end; reset it if the body failed or was interrupted,
    so the peer never mistakes a cut-off stream for a complete one."""
    try:
        yield stream
    except BaseException:
        stream.reset(ErrorCode.CANCELLED)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def announce(args: argparse.Namespace, cap: Capability, what: str) -> None:
    """Hand the capability to the user: stderr (and ``--uri-file``), never stdout."""
    if args.uri_file is not None:
        write_secret(args.uri_file, f"{cap}\n")
    if quiet() and args.uri_file is not None:
        return
    info(f"{what}; the capability below is a secret: whoever holds it may connect")
    say(str(cap))
    if cap.hints and all(_is_local(h) for h in cap.hints):
        info("(reachable from this machine only: use --listen/--advertise or --relay for others)")


def _is_local(hint: object) -> bool:
    if isinstance(hint, UnixHint):
        return True
    if isinstance(hint, TcpHint):
        return hint.host in ("localhost", "::1") or hint.host.startswith("127.")
    return False


def add_node_options(parser: argparse.ArgumentParser, *, sturdy: bool) -> None:
    """The options of listening commands: addresses, relays, caveats, URI file."""
    parser.add_argument(
        "--listen", action="append", metavar="ADDR",
        help="accept sessions on tcp:HOST:PORT or unix:/PATH (repeatable; "
        "default tcp:127.0.0.1:0, or none with --relay)",
    )  # fmt: skip
    parser.add_argument(
        "--advertise", action="append", metavar="ADDR",
        help="route hint to put into the capability instead of the bound addresses",
    )  # fmt: skip
    parser.add_argument(
        "--relay", action="append", metavar="URI", type=uri_argument,
        help="register with this relay and add it to the capability (repeatable; - or @FILE)",
    )  # fmt: skip
    parser.add_argument(
        "--uri-file", type=Path, metavar="PATH",
        help="also write the capability to PATH (mode 0600), for scripts",
    )  # fmt: skip
    parser.add_argument("--no-direct", action="store_true", help=_NO_DIRECT)
    add_caveat_options(parser)
    if sturdy:
        parser.add_argument(
            "--name", metavar="NAME",
            help="a sturdy capability: the same URI across restarts (kept in --state-dir; "
            "revocable with `capsock revoke`)",
        )  # fmt: skip
        add_state_dir_option(parser)


def add_relay_timeout_option(parser: argparse.ArgumentParser) -> None:
    """``--timeout``: how long a listening command waits for its relays (exit code 5)."""
    parser.add_argument(
        "--timeout", type=parse_duration, metavar="DURATION",
        help="with --relay: give up (exit code 5) if a relay is not registered within "
        "DURATION (default: hand out the capability after 15 s and keep trying)",
    )  # fmt: skip


def add_caveat_options(parser: argparse.ArgumentParser, uses_help: str | None = None) -> None:
    parser.add_argument(
        "--ttl", type=parse_duration, metavar="DURATION",
        help="expire after DURATION (seconds, or 30s, 15m, 2h, 7d)",
    )  # fmt: skip
    parser.add_argument(
        "--uses", type=parse_uses, metavar="N",
        help=uses_help or "allow N streams to be opened with it",
    )  # fmt: skip
    parser.add_argument(
        "--peer", type=parse_node_id, metavar="NODEID",
        help="only the node with this id may use it (its `capsock id`)",
    )  # fmt: skip
    parser.add_argument("--label", metavar="TEXT", help="a label for logs (restricts nothing)")


def add_state_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, metavar="DIR",
        help="identity and capability store (default: $XDG_STATE_HOME/capsock)",
    )  # fmt: skip


def add_dialer_options(parser: argparse.ArgumentParser) -> None:
    add_state_dir_option(parser)
    parser.add_argument(
        "--ephemeral", action="store_true",
        help="dial with a fresh identity instead of this machine's",
    )  # fmt: skip
    parser.add_argument("--no-direct", action="store_true", help=_NO_DIRECT)
