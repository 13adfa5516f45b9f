"""Files and directories over a capability, verified end to end: :func:`send_path`,
:func:`receive_path` (the library half of ``capsock send`` / ``capsock receive``).

The protocol (``capsock-send/1``, specified in docs/cli.md) runs on one capsock
stream opened by the receiver.  Control messages are a 4-byte big-endian
length and a msgpack map (the framing of :mod:`capsock.messages`)::

    sender                               receiver
    OFFER   {proto, kind, name, size, ...}  ->
                                         <-  REQUEST {offset, prefix} | {decline[, retry]}
    START   {offset}                     ->
    DATA    (file bytes from offset, or ENTRY messages and file bytes)  ->
    DONE    {sha256}                     ->
                                         <-  RESULT {ok, error?}
    EOF                                  <->  EOF

**Uses are counted by the sender, not at the open.**  A receiver must see the
offer (its name, size and kind) before it can tell whether it can take it, so
:func:`send_path` serves a listener whose capability carries no ``uses``
caveat and counts a use itself: when a receiver *accepts* the offer (sends a
REQUEST), or a plain decline; with ``resumable=True``, only when a receiver
*verified* the whole item.  A decline marked ``retry`` (the receiver's target
exists, it has no room, ...) is not counted.  Once the uses are spent the
listener is closed, so a later open is refused by the node; while they last,
at most as many receivers as uses remain are served at once (others wait in
the listener's queue).  See docs/capabilities.md, "Uses counted by the service".
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc

from ..errors import CapsockError, ErrorCode, LocalUsageError
from ..keys import NodeId
from ..messages import printable
from ..net.stream import Stream
from ..node import Listener
from ._files import open_dir_below
from ._receive import Received, receive_offer
from ._wire import (
    CHUNK,
    MAX_ENTRIES,
    MAX_MTIME,
    MAX_SIZE,
    PROTOCOL,
    STREAM_ERRORS,
    NotAnOffer,
    Offer,
    ProgressCallback,
    Report,
    TransferDeclined,
    TransferError,
    TransferIntegrityError,
    TransferProgress,
    UnsafeTarget,
    check_name,
    encode,
    goodbye,
    looks_like_offer,
    parse_offer,
    read_message,
)
from ._wire import field as _field

__all__ = [
    "MAX_ENTRIES",
    "MAX_MTIME",
    "MAX_SIZE",
    "PROTOCOL",
    "Entry",
    "Item",
    "NotAnOffer",
    "Offer",
    "ProgressCallback",
    "Received",
    "Sent",
    "TransferDeclined",
    "TransferError",
    "TransferIntegrityError",
    "TransferProgress",
    "UnsafeTarget",
    "check_name",
    "looks_like_offer",
    "parse_offer",
    "receive_path",
    "scan",
    "send_path",
]

log = logging.getLogger("capsock.transfer")

OFFER_TIMEOUT = 30.0
"""How long :func:`receive_path` waits for the offer by default (seconds)."""
ANSWER_TIMEOUT = 60.0
"""How long :func:`send_path` waits for a receiver to accept or decline (seconds)."""


# ------------------------------------------------------------------ what is sent


@dataclass(slots=True)
class Entry:
    """One directory entry of a directory transfer."""

    path: str  # relative, "/"-separated
    kind: str  # "dir" or "file"
    source: Path
    size: int = 0
    mode: int = 0o755
    mtime: float = 0.0


@dataclass(slots=True)
class Item:
    """A file or directory to send, as :func:`scan` found it."""

    kind: str
    """``"file"`` or ``"dir"``."""
    name: str
    """The name offered (the last component of the path)."""
    source: Path
    """Where it is read from."""
    size: int
    """A file's length, or the total of a directory's files."""
    mode: int
    mtime: float
    entries: list[Entry] = field(default_factory=list)

    def offer(self, *, resumable: bool = False) -> dict[str, Any]:
        offer: dict[str, Any] = {
            "proto": PROTOCOL,
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "mode": self.mode,
            "mtime": self.mtime,
            "retry_ok": True,
        }
        if resumable:
            offer["resumable"] = True
        if self.kind == "dir":
            offer["entries"] = len(self.entries)
        return offer


def _wire_mtime(mtime: float) -> float:
    """A modification time a receiver accepts (before 1970 or far ahead: clamped)."""
    return min(max(mtime, 0.0), float(MAX_MTIME)) if math.isfinite(mtime) else 0.0


def scan(path: str | os.PathLike[str], on_info: Report | None = None) -> Item:
    """What :func:`send_path` sends for ``path``.  Symlinks and special files
    inside a directory are skipped (with a line to ``on_info``).

    Raises:
        TransferError: ``path`` does not exist or is neither a file nor a directory.
    """
    say = on_info or log.info
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise TransferError(f"cannot send {path}: {exc.strerror}") from None
    name = path.resolve().name or "root"
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return Item("file", name, path, st.st_size, mode, _wire_mtime(st.st_mtime))
    if not stat.S_ISDIR(st.st_mode):
        raise TransferError(f"cannot send {path}: not a regular file or a directory")
    item = Item("dir", name, path, 0, mode, _wire_mtime(st.st_mtime))
    for top, dirs, files in os.walk(path, onerror=_walk_error):
        dirs.sort()
        rel_top = Path(top).relative_to(path)
        for names, expect_dir in ((dirs, True), (sorted(files), False)):
            for entry_name in list(names):
                full = Path(top) / entry_name
                rel = (rel_top / entry_name).as_posix()
                est = full.lstat()
                if expect_dir and stat.S_ISDIR(est.st_mode):
                    item.entries.append(Entry(rel, "dir", full, 0, stat.S_IMODE(est.st_mode)))
                elif stat.S_ISREG(est.st_mode):
                    size = est.st_size
                    emode = stat.S_IMODE(est.st_mode)
                    mtime = _wire_mtime(est.st_mtime)
                    item.entries.append(Entry(rel, "file", full, size, emode, mtime))
                    item.size += size
                else:
                    say(f"skipping {full}: not a regular file or directory (symlinks are skipped)")
                    if expect_dir:
                        names.remove(entry_name)
    return item


def _walk_error(exc: OSError) -> None:
    raise TransferError(f"cannot read {exc.filename}: {exc.strerror}")


def _read_hashed(f: BinaryIO, n: int, h: Any) -> bytes:
    data = f.read(n)
    h.update(data)
    return data


def _hash_prefix(path: Path, n: int) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while n > 0:
            data = f.read(min(CHUNK, n))
            if not data:
                break
            h.update(data)
            n -= len(data)
    return h


# ------------------------------------------------------------------ send


def _open_entry(root: Path, rel: str) -> BinaryIO:
    """A directory entry to send, opened below ``root`` without following any link.

    ``scan`` skipped links, but whoever can write into the tree could put one in
    place of a file or a subdirectory before it is sent; following it would send
    a file of the sender's that was never offered.

    Raises:
        TransferError: the entry is now a link, or not a regular file.
    """
    parts = rel.split("/")
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = open_dir_below(top, parts[:-1])
    except OSError:
        raise TransferError(f"{root / rel} changed while it was being sent (a link?)") from None
    finally:
        os.close(top)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, dir_fd=parent)
    except OSError:
        raise TransferError(f"{root / rel} changed while it was being sent (a link?)") from None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferError(f"{root / rel} is no longer a regular file; it was not sent")
    return os.fdopen(fd, "rb")


@dataclass(frozen=True, slots=True)
class Sent:
    """The outcome of one receiver's transfer, as :func:`send_path` saw it."""

    peer: NodeId
    """The receiver's node id."""
    ok: bool
    """The receiver verified the whole item and has it in place."""
    counted: bool
    """This transfer used up one of the capability's uses."""
    declined: bool = False
    """The receiver declined the offer (``error`` says why, in its words)."""
    error: str | None = None
    """Why it failed (None when ``ok``); never contains a token."""
    start: int = 0
    """The byte the data started at (a resumed file: where it resumed)."""


class _Counter:
    """The uses left, and the receivers being served; who may be accepted next."""

    def __init__(self, uses: int) -> None:
        self.left = uses
        self.serving = 0
        self.changed = anyio.Event()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def release(self) -> None:
        """A receiver served without spending a use (declined, failed while resumable)."""
        self.serving -= 1
        self._wake()

    def spend(self) -> None:
        """One use spent now; the receiver is still being served."""
        self.left -= 1
        self.serving -= 1
        self._wake()


async def _send_bytes(
    stream: Stream,
    f: BinaryIO,
    shown: Path,
    start: int,
    size: int,
    h: Any,
    track: Callable[[int], None],
) -> None:
    with f:
        f.seek(start)
        remaining = size - start
        while remaining:
            data = await anyio.to_thread.run_sync(_read_hashed, f, min(CHUNK, remaining), h)
            if not data:
                raise TransferError(f"{shown} shrank while it was being sent; send it again")
            await stream.send(data)
            remaining -= len(data)
            track(len(data))


async def _serve_one(
    stream: Stream,
    item: Item,
    *,
    resumable: bool,
    spend: Callable[[], None],
    progress: ProgressCallback | None,
    say: Report,
) -> Sent:
    """The sender's side of one transfer.  ``spend()`` is called when it counts."""
    peer = stream.peer
    await stream.send(encode(item.offer(resumable=resumable)))
    with anyio.fail_after(ANSWER_TIMEOUT):
        request, _ = await read_message(stream)
    if "decline" in request:
        retry = request.get("retry") is True
        why = printable(request["decline"])
        if not (resumable or retry):
            spend()
        return Sent(peer, False, not (resumable or retry), True, why)
    offset = _field(request, "offset", int, "request")
    if not resumable:
        spend()
    h = hashlib.sha256()
    start = 0
    if item.kind == "file" and 0 < offset <= item.size and isinstance(request.get("prefix"), bytes):
        h = await anyio.to_thread.run_sync(_hash_prefix, item.source, offset)
        if h.digest() == request["prefix"]:
            start = offset
            say(f"{peer.short()} resumes at {offset} of {item.size} bytes")
        else:
            h = hashlib.sha256()
            say(f"{peer.short()} has a partial file that differs from {item.name}: starting over")
    await stream.send(encode({"offset": start}))
    done = start

    def track(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(TransferProgress(item.name, peer, done, item.size, start))

    if item.kind == "file":
        f: BinaryIO = item.source.open("rb")
        await _send_bytes(stream, f, item.source, start, item.size, h, track)
    else:
        for entry in item.entries:
            header = {"path": entry.path, "type": entry.kind, "mode": entry.mode}
            if entry.kind == "file":
                header |= {"size": entry.size, "mtime": entry.mtime}
            raw = encode(header)
            h.update(raw)
            await stream.send(raw)
            if entry.kind == "file":
                f = await anyio.to_thread.run_sync(_open_entry, item.source, entry.path)
                await _send_bytes(stream, f, entry.source, 0, entry.size, h, track)
    await stream.send(encode({"sha256": h.digest()}))
    result, _ = await read_message(stream)
    await goodbye(stream)
    if result.get("ok") is not True:
        return Sent(peer, False, not resumable, False, printable(result.get("error")), start)
    if resumable:
        spend()
    return Sent(peer, True, True, False, None, start)


async def send_path(
    listener: Listener,
    path: str | os.PathLike[str] | Item,
    *,
    uses: int = 1,
    resumable: bool = False,
    progress: ProgressCallback | None = None,
    on_info: Report | None = None,
    on_result: Callable[[Sent], None] | None = None,
) -> list[Sent]:
    """Offer the file or directory ``path`` to receivers of ``listener.uri``.

    Serves one receiver per stream until ``uses`` transfers have counted
    (docs/cli.md, "send"), then closes ``listener`` and returns the outcome of
    every receiver served.  It also returns when the listener closes otherwise
    (its capability expired, ``aclose()``); cancel it to stop.

    Give it a listener whose capability has no ``uses`` caveat (``node.listen()``,
    or ``node.mint(ttl=...)``): the node would count every open, declines
    included.

    Args:
        listener: where receivers come in.
        path: the file or directory (or an :class:`Item` from :func:`scan`).
        uses: how many transfers may be counted (1: one-shot).
        resumable: count a use only when a receiver verified the whole item;
            a failed transfer can then be resumed with the same capability
            (a file continues where it stopped, a directory starts over).
            Otherwise a use counts when a receiver accepts the offer.
        progress: called after each chunk sent (a :class:`TransferProgress`).
        on_info: where per-transfer lines go (default: the ``capsock.transfer``
            logger at INFO).  Never contains a token.
        on_result: called with each :class:`Sent` as it is known.

    Raises:
        TransferError: ``path`` cannot be sent (missing, not a file or directory).
        LocalUsageError: ``uses`` is below 1.
    """
    if uses < 1:
        raise LocalUsageError("uses must be 1 or more")
    say = on_info or log.info
    item = path if isinstance(path, Item) else scan(path, say)
    counter = _Counter(uses)
    outcomes: list[Sent] = []

    async def one(stream: Stream) -> None:
        spent = False

        def spend() -> None:
            nonlocal spent
            spent = True
            counter.spend()
            if counter.left <= 0:
                listener._retire()  # no new opens; queued ones are closed with the listener

        try:
            outcome = await _serve_one(
                stream, item, resumable=resumable, spend=spend, progress=progress, say=say
            )
        except (*STREAM_ERRORS, anyio.EndOfStream, TransferError, OSError) as exc:
            stream.reset(ErrorCode.CANCELLED)
            why = "it closed the stream" if isinstance(exc, anyio.EndOfStream) else str(exc)
            if isinstance(exc, TimeoutError):
                why = f"it did not answer the offer within {ANSWER_TIMEOUT:g} s"
            elif isinstance(exc, OSError) and not isinstance(exc, CapsockError):
                why = f"cannot read what was offered: {exc.strerror or exc}"
            outcome = Sent(stream.peer, False, spent, False, why)
        except BaseException:
            stream.reset(ErrorCode.CANCELLED)
            raise
        finally:
            if not spent:
                counter.release()
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        outcomes.append(outcome)
        if on_result is not None:
            on_result(outcome)

    async with anyio.create_task_group() as tg:
        while counter.left > 0:
            if counter.serving >= counter.left:
                await counter.changed.wait()
                continue
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                break
            counter.serving += 1
            tg.start_soon(one, stream)
    await listener.aclose()
    retired = listener._node._retired_roots
    root_id = listener.uri.token.root_id
    if counter.left <= 0 and root_id in retired:
        retired[root_id] = "used up"  # what a later open is logged as
    return outcomes


async def receive_path(
    stream: Stream,
    output: str | os.PathLike[str] | BinaryIO | None = None,
    *,
    progress: ProgressCallback | None = None,
    on_info: Report | None = None,
    offer_timeout: float = OFFER_TIMEOUT,
) -> Received:
    """Receive what :func:`send_path` (or ``capsock send``) offers on ``stream``.

    ``stream`` is one opened with the sender's capability (``await
    node.connect(uri)``); it is closed when this returns (reset on failure).

    Args:
        output: ``None``: the offered name in the current directory; an
            existing directory: the offered name inside it; another path: that
            name; a binary file object (``sys.stdout.buffer``): a file's bytes
            are written to it (a directory is declined).  An existing target
            is never replaced; data goes to ``TARGET.capsock-part`` first and
            is renamed only after the SHA-256 check; a partial file of an
            earlier attempt is resumed.  Every file is created inside a
            directory descriptor opened once, never through a link.
        progress: called after each chunk received (a :class:`TransferProgress`).
        on_info: where progress lines (resuming, starting over) go (default:
            the ``capsock.transfer`` logger at INFO).
        offer_timeout: how long to wait for the offer, in seconds.

    Raises:
        NotAnOffer: no offer came (not a ``send`` capability, or it was used meanwhile).
        TransferDeclined: this side declined the offer (the target exists, a
            directory to a file object, no room, a malformed offer, an unsafe
            target): ``retry`` says whether the sender was told it is a fixable
            mistake; the message says whether the sender counted it as a use.
        UnsafeTarget: a link or another user's file appeared where it writes.
        TransferIntegrityError: the SHA-256 check failed (nothing is kept).
        TransferError: the transfer failed otherwise (the message says why,
            and whether receiving again resumes).
    """
    say = on_info or log.info
    try:
        result = await receive_offer(stream, output, wait=offer_timeout, progress=progress, say=say)
    except TransferDeclined:  # the decline and EOF are sent: let them arrive
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    except BaseException:
        stream.reset(ErrorCode.CANCELLED)
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    with anyio.CancelScope(shield=True):
        await stream.aclose()
    return result
