"""``send`` / ``receive``: thin callers of :func:`capsock.transfer.send_path` and
:func:`capsock.transfer.receive_path` (the protocol, ``capsock-send/1``, is
specified in docs/cli.md and implemented in :mod:`capsock.transfer`).

What is the command line's own: the progress bar, the messages and exit codes,
``--name`` (a sturdy offer that stays the same URI until it is complete: the
sender counts a use only once a receiver verified it, and revokes the name
then), and the checks made before dialing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import CapabilityRejected, Unreachable
from ..keys import NodeId
from ..net.stream import Stream
from ..node import Node
from ..transfer import (
    Item,
    Sent,
    TransferError,
    TransferIntegrityError,
    TransferProgress,
    receive_path,
    scan,
    send_path,
)
from ..uri import Capability
from .common import (
    CliError,
    Exit,
    announce,
    dialing_node,
    info,
    listening_node,
    make_listener,
    read_capability,
    say,
)
from .progress import Progress, human_bytes

__all__ = ["cmd_receive", "cmd_send"]


class _Bars:
    """Progress bars (one per peer) fed by the library's progress callback."""

    def __init__(self, label: str | None = None, *, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.bars: dict[NodeId, Progress] = {}

    def __call__(self, p: TransferProgress) -> None:
        bar = self.bars.get(p.peer)
        if bar is None:
            label = p.name if self.label is None else f"{self.label} -> {p.peer.short()}"
            bar = self.bars[p.peer] = Progress(label, p.total, p.start)
            bar.enabled = bar.enabled and self.enabled
        bar.advance(p.done - bar.done)

    def finish(self, peer: NodeId, total: int = 0, start: int = 0) -> str:
        """End the bar of ``peer``; its summary line."""
        bar = self.bars.pop(peer, None)
        if bar is None:
            bar = Progress("", total, start)
            bar.enabled = False
        bar.finish()
        return bar.summary()


def _without_uses(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` for :func:`make_listener` without ``--uses``: send counts its uses itself."""
    return argparse.Namespace(**{**vars(args), "uses": None})


def _report(item: Item, bars: _Bars) -> Callable[[Sent], None]:
    def report(sent: Sent) -> None:
        peer = sent.peer.short()
        summary = bars.finish(sent.peer, item.size, sent.start)
        if sent.ok:
            info(f"sent {item.name} to {sent.peer} ({summary}); the receiver verified it")
        elif sent.declined and not sent.counted:
            info(
                f"the receiver {peer} declined: {sent.error}; not counted as a use: the "
                "capability still works"
            )
        elif sent.declined:
            say(f"capsock: error: the receiver {peer} declined: {sent.error}")
        elif sent.counted:
            say(f"capsock: error: the transfer to {peer} failed: {sent.error}")
        else:
            say(
                f"capsock: error: the transfer to {peer} failed: {sent.error}; not counted: "
                "receiving again with the same capability "
                + ("resumes it" if item.kind == "file" else "starts it over")
            )

    return report


async def cmd_send(args: argparse.Namespace) -> int:
    """Offer a file or directory behind a (by default one-shot) capability."""
    try:
        item = scan(Path(args.path), info)
    except TransferError as exc:
        raise CliError(str(exc)) from None
    uses = args.uses or 1
    name = getattr(args, "name", None)
    resumable = bool(name)
    bars = _Bars(item.name, enabled=uses == 1)
    async with listening_node(args) as node:
        listener, cap = await make_listener(node, _without_uses(args))
        what = f"{item.kind} {item.name} ({human_bytes(item.size)})"
        times = "once" if uses == 1 else f"{uses} times"
        until = " (the same URI until it is complete, across restarts)" if name else ""
        announce(
            args, cap, f"offering {what} {times}{until}: run `capsock receive URI` to fetch it"
        )
        report = _report(item, bars)
        outcomes = await send_path(
            listener, item, uses=uses, resumable=resumable, progress=bars,
            on_info=info, on_result=report,
        )  # fmt: skip
        counted = [o for o in outcomes if o.counted]
        if name and len(counted) >= uses and all(o.ok for o in counted):
            await node.revoke(listener.uri)  # complete: the next `send --name` is a new URI
            info(f"the sturdy name {name!r} is complete and revoked")
    if not counted:
        raise CliError("nobody received it before the capability expired; run `capsock send` again")
    if not all(o.ok for o in counted):
        again = (
            "a receiver resumes a file where it stopped"
            if item.kind == "file"
            else "a directory starts over"
        )
        raise CliError(
            "a transfer did not complete (see above); run `capsock send` again and "
            f"hand out its new capability: {again}"
        )
    return Exit.OK


def _check_output(output: str | None) -> None:
    """Refuse an existing ``-o`` file before connecting (a one-shot capability is not wasted)."""
    if output not in (None, "-"):
        out = Path(output)
        if (out.exists() or out.is_symlink()) and not out.is_dir():
            raise CliError(f"{out} exists: remove it or choose another name with -o")


async def _connect(node: Node, cap: Capability) -> Stream:
    try:
        return await node.connect(cap)
    except CapabilityRejected as exc:
        raise CliError(
            f"{exc} (a `capsock send` capability works once unless sent with --uses N)",
            Exit.REFUSED,
        ) from None
    except Unreachable as exc:
        raise CliError(
            f"{exc}; is the sender still running? `capsock send` exits once its "
            "capability is used up: ask for a new one",
            Exit.UNREACHABLE,
        ) from None


async def cmd_receive(args: argparse.Namespace) -> int:
    """Fetch what ``capsock send`` offers."""
    cap = read_capability(args.uri)
    _check_output(args.output)
    bars = _Bars()
    async with dialing_node(args, cap) as node:
        stream = await _connect(node, cap)
        output = sys.stdout.buffer if args.output == "-" else args.output
        try:
            try:
                got = await receive_path(stream, output, progress=bars, on_info=info)
            except TransferIntegrityError as exc:
                raise CliError(str(exc), Exit.INTEGRITY) from None
            except TransferError as exc:
                raise CliError(str(exc)) from None
            except BrokenPipeError:
                raise CliError("stdout was closed before the transfer ended") from None
        except BaseException:
            for peer in list(bars.bars):
                bars.finish(peer)
            raise
    summary = bars.finish(stream.peer, got.offer.size, got.start)
    shown = f"{got.path}/" if got.path is not None and got.offer.kind == "dir" else got.path
    info(f"received {shown or got.offer.name} ({summary}); SHA-256 verified")
    return Exit.OK
