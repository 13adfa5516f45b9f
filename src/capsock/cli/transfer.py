"""``send`` / ``receive``: files and directories, verified end to end, files resumable.

The protocol (``capsock-send/1``, specified in docs/cli.md) runs on one capsock
stream opened by the receiver.  Control messages are a 4-byte big-endian
length and a msgpack map (the framing of :mod:`capsock.messages`)::

    sender                               receiver
    OFFER   {proto, kind, name, size, ...}  ->
                                         <-  REQUEST {offset, prefix} | {decline}
    START   {offset}                     ->
    DATA    (file bytes from offset, or ENTRY messages and file bytes)  ->
    DONE    {sha256}                     ->
                                         <-  RESULT {ok, error?}
    EOF                                  <->  EOF
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import anyio
import anyio.abc
import msgpack

from ..errors import CapabilityRejected, CapsockError, Unreachable
from ..messages import printable
from ..stream import Stream
from .common import (
    CliError,
    Exit,
    announce,
    dialing_node,
    info,
    listening_node,
    make_listener,
    read_capability,
    resetting,
    say,
)
from .files import Place, UnsafeFile, open_dir_below
from .progress import Progress, human_bytes

__all__ = ["PROTOCOL", "cmd_receive", "cmd_send"]

PROTOCOL = "capsock-send/1"
PART_SUFFIX = ".capsock-part"
MAX_MESSAGE = 64 * 1024
_LEN = struct.Struct(">I")
_CHUNK = 1 << 20
_OFFER_TIMEOUT = 30.0
_GOODBYE_TIMEOUT = 5.0
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, CapsockError)
MAX_SIZE = 1 << 62
"""The largest ``size`` a receiver accepts (4 EiB: any file a file system can hold)."""
MAX_MTIME = 1 << 34
"""The latest ``mtime`` accepted (seconds; 1 << 34 is in the year 2514)."""
MAX_ENTRIES = 1 << 32
MAX_PATH = 4096
_MODE_MAX = 0o7777


# ------------------------------------------------------------------ framing


def encode(obj: dict[str, Any]) -> bytes:
    """One control message: length prefix and msgpack body."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


async def _read_exactly(stream: anyio.abc.ByteReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive(n - len(out))
    return bytes(out)


async def read_message(stream: anyio.abc.ByteReceiveStream) -> tuple[dict[str, Any], bytes]:
    """The next control message, decoded, and its raw bytes (prefix included).

    Raises:
        CliError: too large or not a msgpack map.
        anyio.EndOfStream: the stream ended.
    """
    prefix = await _read_exactly(stream, 4)
    (size,) = _LEN.unpack(prefix)
    if size > MAX_MESSAGE:
        raise CliError(f"the other side sent a {size}-byte message; is it running `capsock send`?")
    body = await _read_exactly(stream, size)
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException):
        obj = None
    if not isinstance(obj, dict):
        raise CliError("the other side sent a malformed message (not capsock-send/1)")
    return obj, prefix + body


def _field(msg: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CliError(f"the other side sent a malformed {what} (field {key!r})")
    return value


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
    """The file or directory given to ``capsock send``."""

    kind: str
    name: str
    source: Path
    size: int
    mode: int
    mtime: float
    entries: list[Entry] = field(default_factory=list)

    def offer(self) -> dict[str, Any]:
        offer: dict[str, Any] = {
            "proto": PROTOCOL,
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "mode": self.mode,
            "mtime": self.mtime,
        }
        if self.kind == "dir":
            offer["entries"] = len(self.entries)
        return offer


def _wire_mtime(mtime: float) -> float:
    """A modification time a receiver accepts (before 1970 or far ahead: clamped)."""
    return min(max(mtime, 0.0), float(MAX_MTIME)) if math.isfinite(mtime) else 0.0


def scan(path: Path) -> Item:
    """What ``capsock send PATH`` will send.  Symlinks and special files inside a
    directory are skipped (with a message).

    Raises:
        CliError: ``path`` does not exist or is neither a file nor a directory.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise CliError(f"cannot send {path}: {exc.strerror}") from None
    name = path.resolve().name or "root"
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        return Item("file", name, path, st.st_size, mode, _wire_mtime(st.st_mtime))
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"cannot send {path}: not a regular file or a directory")
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
                    mode = stat.S_IMODE(est.st_mode)
                    mtime = _wire_mtime(est.st_mtime)
                    item.entries.append(Entry(rel, "file", full, size, mode, mtime))
                    item.size += size
                else:
                    info(f"skipping {full}: not a regular file or directory (symlinks are skipped)")
                    if expect_dir:
                        names.remove(entry_name)
    return item


def _walk_error(exc: OSError) -> None:
    raise CliError(f"cannot read {exc.filename}: {exc.strerror}")


def _read_hashed(f: BinaryIO, n: int, h: Any) -> bytes:
    data = f.read(n)
    h.update(data)
    return data


def _hash_prefix(path: Path, n: int) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while n > 0:
            data = f.read(min(_CHUNK, n))
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
        CliError: the entry is now a link, or not a regular file.
    """
    parts = rel.split("/")
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = open_dir_below(top, parts[:-1])
    except OSError:
        raise CliError(f"{root / rel} changed while it was being sent (a link?)") from None
    finally:
        os.close(top)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(parts[-1], flags, dir_fd=parent)
    except OSError:
        raise CliError(f"{root / rel} changed while it was being sent (a link?)") from None
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CliError(f"{root / rel} is no longer a regular file; it was not sent")
    return os.fdopen(fd, "rb")


async def _send_file_bytes(
    stream: Stream, f: BinaryIO, shown: Path, start: int, size: int, h: Any, progress: Progress
) -> None:
    with f:
        f.seek(start)
        remaining = size - start
        while remaining:
            data = await anyio.to_thread.run_sync(_read_hashed, f, min(_CHUNK, remaining), h)
            if not data:
                raise CliError(f"{shown} shrank while it was being sent; send it again")
            await stream.send(data)
            remaining -= len(data)
            progress.advance(len(data))


async def serve_transfer(stream: Stream, item: Item, *, bar: bool) -> bool:
    """Run the sender's side of one transfer; True when the receiver verified it."""
    peer = stream.peer.short()
    await stream.send(encode(item.offer()))
    request, _ = await read_message(stream)
    if "decline" in request:
        say(f"capsock: error: the receiver {peer} declined: {printable(request['decline'])}")
        return False
    offset = _field(request, "offset", int, "request")
    h = hashlib.sha256()
    start = 0
    if item.kind == "file" and 0 < offset <= item.size and isinstance(request.get("prefix"), bytes):
        h = await anyio.to_thread.run_sync(_hash_prefix, item.source, offset)
        if h.digest() == request["prefix"]:
            start = offset
            info(f"{peer} resumes at {human_bytes(offset)} of {human_bytes(item.size)}")
        else:
            h = hashlib.sha256()
            info(f"{peer} has a partial file that differs from {item.name}: starting over")
    await stream.send(encode({"offset": start}))
    progress = Progress(f"{item.name} -> {peer}", item.size, start)
    progress.enabled = progress.enabled and bar
    if item.kind == "file":
        f: BinaryIO = item.source.open("rb")
        await _send_file_bytes(stream, f, item.source, start, item.size, h, progress)
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
                await _send_file_bytes(stream, f, entry.source, 0, entry.size, h, progress)
    await stream.send(encode({"sha256": h.digest()}))
    progress.finish()
    result, _ = await read_message(stream)
    await stream.send_eof()
    with anyio.move_on_after(_GOODBYE_TIMEOUT):
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, *_STREAM_ERRORS):
            pass
    if result.get("ok") is not True:
        say(f"capsock: error: the receiver {peer} reports: {printable(result.get('error'))}")
        return False
    info(f"sent {item.name} to {stream.peer} ({progress.summary()}); the receiver verified it")
    return True


async def cmd_send(args: argparse.Namespace) -> int:
    """Offer a file or directory behind a (by default one-shot) capability."""
    item = scan(Path(args.path))
    outcomes: list[bool] = []

    async def one(stream: Stream, bar: bool) -> None:
        try:
            async with resetting(stream):
                outcomes.append(await serve_transfer(stream, item, bar=bar))
        except (*_STREAM_ERRORS, anyio.EndOfStream, CliError) as exc:
            why = "it closed the stream" if isinstance(exc, anyio.EndOfStream) else str(exc)
            say(f"capsock: error: the transfer to {stream.peer.short()} failed: {why}")
            outcomes.append(False)

    async with listening_node(args) as node:
        listener, cap = await make_listener(node, args, uses=1)
        uses = args.uses or 1
        what = f"{item.kind} {item.name} ({human_bytes(item.size)})"
        times = "once" if uses == 1 else f"{uses} times"
        announce(args, cap, f"offering {what} {times}: run `capsock receive URI` to fetch it")
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.ClosedResourceError:
                    break
                tg.start_soon(one, stream, uses == 1)
    if not outcomes:
        raise CliError("nobody received it before the capability expired; run `capsock send` again")
    if not all(outcomes):
        raise CliError(
            "a transfer did not complete (see above); run `capsock send` again and "
            "hand out its new capability: a receiver resumes a file where it stopped"
        )
    return Exit.OK


# ------------------------------------------------------------------ receive


class _Malformed(CliError):
    """An offer or entry field the receiver refuses; ``remote`` is what the sender is told."""

    def __init__(self, local: str, remote: str) -> None:
        super().__init__(local)
        self.remote = remote


def _check_name(name: object, what: str) -> str:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or not name.isprintable()  # control characters (NUL too): terminal escapes in messages
        or len(name.encode("utf-8", "surrogateescape")) > 255
    ):
        raise _Malformed(
            f"the sender offered an unsafe {what} {printable(repr(name))}; refusing it",
            f"unsafe {what} (one path component: not empty, . or .., no / or control "
            "characters, at most 255 bytes)",
        )
    return name


def _safe_relative(path: object) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        raise _Malformed("the sender sent an unsafe path; refusing it", "unsafe path")
    for part in path.split("/"):
        _check_name(part, "path")
    return path


def _int_field(msg: dict[str, Any], key: str, high: int, what: str) -> int:
    value = msg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        rule = f"{key!r} must be an integer from 0 to {high}"
        raise _Malformed(
            f"the sender sent a malformed {what}: {rule} (got {printable(repr(value))}); "
            "refusing it",
            f"malformed {what}: {rule}",
        )
    return value


def _time_field(msg: dict[str, Any], key: str, what: str) -> float:
    value = msg.get(key)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_MTIME
    ):
        rule = f"{key!r} must be a number of seconds from 0 to {MAX_MTIME}"
        raise _Malformed(
            f"the sender sent a malformed {what}: {rule} (got {printable(repr(value))}); "
            "refusing it",
            f"malformed {what}: {rule}",
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class Offer:
    """A checked OFFER: every field typed and in range."""

    kind: str
    name: str
    size: int
    mode: int
    mtime: float
    entries: int


def parse_offer(msg: dict[str, Any]) -> Offer:
    """Check every field of an OFFER (docs/cli.md) before anything is accepted.

    Raises:
        CliError: a field is missing, of the wrong type, or out of range
            (with ``remote``: the reason to send the sender, no local path in it).
    """
    kind = msg.get("kind")
    if kind not in ("file", "dir"):
        shown = printable(repr(kind))
        raise _Malformed(
            f"the sender offered an unknown kind {shown}; upgrade capsock",
            f"unknown kind {shown}; upgrade capsock",
        )
    what = "file name" if kind == "file" else "directory name"
    name = _check_name(msg.get("name"), what)
    size = _int_field(msg, "size", MAX_SIZE, "offer")
    mode = _int_field(msg, "mode", _MODE_MAX, "offer")
    mtime = _time_field(msg, "mtime", "offer")
    entries = _int_field(msg, "entries", MAX_ENTRIES, "offer") if kind == "dir" else 0
    return Offer(str(kind), name, size, mode, mtime, entries)


def _target(output: str | None, name: str) -> Path | None:
    """Where the received item goes (None: stdout)."""
    if output == "-":
        return None
    if output is None:
        return Path.cwd() / name
    out = Path(output)
    return out / name if out.is_dir() else out


def _mode(mode: int, umask: int) -> int:
    return mode & 0o777 & ~umask


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Sink:
    """Hashes and writes received bytes in a worker thread (the file, or stdout)."""

    def __init__(self, f: BinaryIO | None, h: Any) -> None:
        self.f = f
        self.h = h
        self.fd = sys.stdout.fileno() if f is None else -1

    def _write(self, data: bytes) -> None:
        self.h.update(data)
        if self.f is not None:
            self.f.write(data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    async def copy(self, stream: Stream, n: int, progress: Progress) -> None:
        """Exactly ``n`` bytes from ``stream``.

        Raises:
            anyio.EndOfStream: the sender ended early.
        """
        while n:
            data = await stream.receive(min(n, _CHUNK))
            n -= len(data)
            await anyio.to_thread.run_sync(self._write, data)
            progress.advance(len(data))


async def _finish(stream: Stream, ok: bool, error: str | None = None) -> None:
    result: dict[str, Any] = {"ok": ok} if ok else {"ok": False, "error": error}
    await stream.send(encode(result))
    await stream.send_eof()
    # Wait for the sender's EOF: it has read the result then.
    with anyio.move_on_after(_GOODBYE_TIMEOUT):
        try:
            while True:
                await stream.receive()
        except (anyio.EndOfStream, *_STREAM_ERRORS):
            pass


async def _decline(stream: Stream, remote: str, local: str) -> NoReturn:
    """Tell the sender ``remote`` (never a local path or user name), fail with ``local``."""
    await stream.send(encode({"decline": remote}))
    await stream.send_eof()
    raise CliError(
        f"{local} (declined; the sender counted this as a use: a one-shot capability "
        "now needs a new `capsock send`)"
    )


_EXISTS = "the receiver already has something by that name"
_NOT_WRITABLE = "the receiver cannot write into its target directory"
_NOT_PLACED = "the receiver could not put the verified data in place"


async def _open_place(stream: Stream, target: Path) -> Place:
    """The target's directory, opened once; decline unless ``target`` can be created."""
    try:
        place = Place(target.parent)
    except CliError as exc:
        await _decline(stream, _NOT_WRITABLE, str(exc))
    if place.exists(target.name):
        place.close()
        local = f"{target} exists: remove it or choose another name with -o"
        await _decline(stream, _EXISTS, local)
    return place


async def _expect_digest(stream: Stream, h: Any) -> bool:
    done, _ = await read_message(stream)
    return bool(_field(done, "sha256", bytes, "digest") == h.digest())


def _hash_fd_prefix(fd: int, n: int) -> Any:
    h = hashlib.sha256()
    pos = 0
    while pos < n:
        data = os.pread(fd, min(_CHUNK, n - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h


async def _exchange_offsets(stream: Stream, offset: int, h: Any) -> int:
    """Send REQUEST, read START: the offset the data starts at."""
    request: dict[str, Any] = {"offset": offset}
    if offset:
        request["prefix"] = h.digest()
    await stream.send(encode(request))
    start_msg, _ = await read_message(stream)
    start = _field(start_msg, "offset", int, "start")
    if start not in (0, offset):
        raise CliError("the sender chose an offset that was not asked for")
    return int(start)


async def _receive_to_stdout(stream: Stream, offer: Offer) -> int:
    h = hashlib.sha256()
    await _exchange_offsets(stream, 0, h)
    progress = Progress(offer.name, offer.size, 0)
    await _Sink(None, h).copy(stream, offer.size, progress)
    progress.finish()
    if not await _expect_digest(stream, h):
        await _finish(stream, False, "SHA-256 mismatch")
        raise CliError(
            f"{offer.name}: the SHA-256 of the received data differs from the sender's",
            Exit.INTEGRITY,
        )
    await _finish(stream, True)
    info(f"received {offer.name} ({progress.summary()}); SHA-256 verified")
    return Exit.OK


async def _receive_file(stream: Stream, offer: Offer, output: str | None) -> int:
    target = _target(output, offer.name)
    if target is None:
        return await _receive_to_stdout(stream, offer)
    place = await _open_place(stream, target)
    try:
        part_name = target.name + PART_SUFFIX
        try:
            fd, resumed = place.open_part(part_name)
        except UnsafeFile as exc:
            await _decline(stream, exc.remote, str(exc))
        with os.fdopen(fd, "r+b") as f:
            progress = await _fill_part(stream, offer, place, part_name, f, resumed)
            os.fchmod(fd, _mode(offer.mode, _umask()))
            os.utime(fd, (offer.mtime, offer.mtime))
            os.fsync(fd)
            try:
                place.rename_noreplace(part_name, target.name, fd)
            except (OSError, CliError) as exc:
                await _finish(stream, False, _NOT_PLACED)
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise CliError(
                    f"{offer.name} was received and verified, but cannot become {target} "
                    f"({why}); it is kept as {place.path / part_name}"
                ) from None
    finally:
        place.close()
    await _finish(stream, True)
    info(f"received {target} ({progress.summary()}); SHA-256 verified")
    return Exit.OK


async def _fill_part(
    stream: Stream, offer: Offer, place: Place, part_name: str, f: BinaryIO, resumed: bool
) -> Progress:
    """Resume or start the partial file ``f`` and check the digest; its progress."""
    part = place.path / part_name
    fd = f.fileno()
    size = offer.size
    h = hashlib.sha256()
    offset = 0
    have = os.fstat(fd).st_size if resumed else 0
    if 0 < have <= size:
        h = await anyio.to_thread.run_sync(_hash_fd_prefix, fd, have)
        offset = have
    start = await _exchange_offsets(stream, offset, h)
    if offset and start == offset:
        info(f"resuming {offer.name} at {human_bytes(offset)} of {human_bytes(size)}")
    elif offset:
        info(f"the partial {part} is not a part of the offered {offer.name}: starting over")
        h = hashlib.sha256()
    elif have:
        info(f"the partial {part} is longer than the offered {offer.name}: starting over")
    progress = Progress(offer.name, size, start)
    f.truncate(start)
    f.seek(start)
    try:
        await _Sink(f, h).copy(stream, size - start, progress)
    except (anyio.EndOfStream, *_STREAM_ERRORS) as exc:
        progress.finish()
        why = "the sender ended the stream" if isinstance(exc, anyio.EndOfStream) else exc
        raise CliError(
            f"the transfer stopped at {human_bytes(progress.done)} of "
            f"{human_bytes(size)} ({why}); {part} is kept: receive again to resume "
            "(a one-shot capability needs a new `capsock send`)"
        ) from None
    except anyio.get_cancelled_exc_class():  # Ctrl-C, SIGTERM
        info(
            f"{part} is kept ({human_bytes(progress.done)} of {human_bytes(size)}): "
            "receive again to resume (a one-shot capability needs a new `capsock send`)"
        )
        raise
    f.flush()
    progress.finish()
    if not await _expect_digest(stream, h):
        place.remove_part(part_name, fd)
        await _finish(stream, False, "SHA-256 mismatch")
        raise CliError(
            f"{offer.name}: the SHA-256 of the received data differs from the sender's; "
            "the partial file was removed: receive it again",
            Exit.INTEGRITY,
        )
    return progress


async def _receive_dir(stream: Stream, offer: Offer, output: str | None) -> int:
    target = _target(output, offer.name)
    if target is None:
        msg = "a directory cannot be written to stdout: use -o DIR"
        await _decline(stream, msg, msg)
    place = await _open_place(stream, target)
    try:
        part_name = target.name + PART_SUFFIX
        if place.exists(part_name):
            info(
                f"removing the partial {place.path / part_name} of an earlier attempt "
                "(directories start over)"
            )
        try:
            top = place.fresh_dir(part_name)
        except UnsafeFile as exc:
            await _decline(stream, exc.remote, str(exc))
        try:
            progress = await _fill_dir(stream, offer, top)
            place.rename_noreplace(part_name, target.name, top)
        except (OSError, UnsafeFile) as exc:
            place.remove_tree(part_name, top)
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            await _finish(stream, False, _NOT_PLACED)
            raise CliError(
                f"{offer.name} was received and verified, but cannot become {target}: {why}"
            ) from None
        except BaseException:
            place.remove_tree(part_name, top)
            raise
        finally:
            os.close(top)
    finally:
        place.close()
    await _finish(stream, True)
    info(f"received {target}/ ({progress.summary()}); SHA-256 verified")
    return Exit.OK


async def _fill_dir(stream: Stream, offer: Offer, top: int) -> Progress:
    """Receive every ENTRY below the directory ``top``, check the digest, set the modes.

    Raises:
        OSError / UnsafeFile: only when setting the modes failed, after the check.
    """
    await stream.send(encode({"offset": 0}))
    start_msg, _ = await read_message(stream)
    if _field(start_msg, "offset", int, "start") != 0:
        raise CliError("the sender chose an offset that was not asked for")
    umask = _umask()
    h = hashlib.sha256()
    progress = Progress(offer.name, offer.size, 0)
    dirs: list[tuple[list[str], int]] = []
    try:
        for _ in range(offer.entries + 1):
            header, raw = await read_message(stream)
            if "sha256" in header:
                break
            h.update(raw)
            await _receive_entry(stream, header, top, dirs, umask, offer.size, h, progress)
        else:
            raise CliError("the sender sent more entries than it offered")
        progress.finish()
    except (anyio.EndOfStream, *_STREAM_ERRORS) as exc:
        progress.finish()
        why = "the sender ended the stream" if isinstance(exc, anyio.EndOfStream) else exc
        raise CliError(f"the transfer of {offer.name} stopped ({why}); receive it again") from None
    except OSError as exc:
        raise CliError(f"cannot write {offer.name}: {exc.strerror}") from None
    if _field(header, "sha256", bytes, "digest") != h.digest():
        await _finish(stream, False, "SHA-256 mismatch")
        raise CliError(
            f"{offer.name}: the SHA-256 of the received data differs from the sender's; "
            "the partial directory was removed: receive it again",
            Exit.INTEGRITY,
        )
    for parts, mode in reversed(dirs):  # children first: a parent may lose its x bit
        try:
            fd = open_dir_below(top, parts)
        except OSError:
            shown = printable("/".join([offer.name, *parts]))
            raise UnsafeFile(f"{shown} was replaced while it was being received") from None
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    os.fchmod(top, _mode(offer.mode, umask))
    return progress


async def _receive_entry(
    stream: Stream,
    header: dict[str, Any],
    top: int,
    dirs: list[tuple[list[str], int]],
    umask: int,
    size: int,
    h: Any,
    progress: Progress,
) -> None:
    """One ENTRY of a directory transfer, created below the directory ``top``.

    Raises:
        CliError: a malformed entry, one sent twice or before its directory.
    """
    rel = _safe_relative(header.get("path"))
    parts = rel.split("/")
    kind = header.get("type")
    if kind not in ("dir", "file"):
        raise CliError(f"the sender sent a malformed entry for {printable(rel)!r}")
    mode = _mode(_int_field(header, "mode", _MODE_MAX, "entry"), umask)
    try:
        parent = open_dir_below(top, parts[:-1])
    except OSError:
        raise CliError(f"the sender sent {printable(rel)!r} before its directory") from None
    try:
        if kind == "dir":
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                raise CliError(f"the sender sent {printable(rel)!r} twice") from None
            dirs.append((parts, mode))
            return
        length = _int_field(header, "size", size - progress.done, "entry")
        mtime = _time_field(header, "mtime", "entry")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        except FileExistsError:
            raise CliError(f"the sender sent {printable(rel)!r} twice") from None
        with os.fdopen(fd, "wb") as f:
            await _Sink(f, h).copy(stream, length, progress)
            f.flush()
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
            os.fsync(fd)
    finally:
        os.close(parent)


def _check_output(output: str | None) -> None:
    """Refuse an existing ``-o`` file before connecting (a one-shot capability is not wasted)."""
    if output not in (None, "-"):
        out = Path(output)
        if (out.exists() or out.is_symlink()) and not out.is_dir():
            raise CliError(f"{out} exists: remove it or choose another name with -o")


async def cmd_receive(args: argparse.Namespace) -> int:
    """Fetch what ``capsock send`` offers."""
    cap = read_capability(args.uri)
    _check_output(args.output)
    async with dialing_node(args, cap) as node:
        try:
            stream = await node.connect(cap)
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
        async with resetting(stream):
            try:
                with anyio.fail_after(_OFFER_TIMEOUT):
                    message, _ = await read_message(stream)
            except TimeoutError:
                raise CliError(
                    "no offer from the other side: is this a `capsock send` capability? "
                    "(`capsock connect` opens plain streams)"
                ) from None
            except anyio.EndOfStream:
                raise CliError("the other side closed the stream without an offer") from None
            if message.get("proto") != PROTOCOL:
                raise CliError(
                    f"the other side does not speak {PROTOCOL}; is this a `capsock send` "
                    "capability?"
                )
            try:
                offer = parse_offer(message)
            except _Malformed as exc:
                await _decline(stream, exc.remote, str(exc))
            if offer.kind == "file":
                return await _receive_file(stream, offer, args.output)
            return await _receive_dir(stream, offer, args.output)
