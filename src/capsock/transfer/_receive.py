"""The receiving side of ``capsock-send/1``: checks first, then descriptor-relative writes.

Everything that can be checked before the offer is accepted is checked then
(the name, the kind, where it goes, the space it needs), and a decline that
the user can fix is marked ``retry``, so that a sender that offered
``retry_ok`` does not count it as a use.  Files are written by
:mod:`capsock.transfer._files` (inside a directory descriptor opened once,
never through a link).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import anyio

from ..messages import printable
from ..net.stream import Stream
from ._files import Place, open_dir_below
from ._wire import (
    CHUNK,
    MODE_MAX,
    PART_SUFFIX,
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
    encode,
    field,
    goodbye,
    int_field,
    parse_offer,
    read_message,
    safe_relative,
    time_field,
)

__all__ = ["Received", "receive_offer"]

_EXISTS = "the receiver already has something by that name"
_NOT_WRITABLE = "the receiver cannot write into its target directory"
_NOT_PLACED = "the receiver could not put the verified data in place"
_NO_SPACE = "the receiver does not have enough free space"
_TO_STDOUT = "a directory cannot be written to stdout: use -o DIR"


@dataclass(frozen=True, slots=True)
class Received:
    """What :func:`capsock.transfer.receive_path` received."""

    offer: Offer
    """The checked offer."""
    path: Path | None
    """Where it is now (None: written to the file object given as ``output``)."""
    start: int
    """The byte it resumed at (0: from the start)."""
    received: int
    """Bytes received in this transfer."""


class _Tracker:
    def __init__(self, stream: Stream, offer: Offer, start: int, cb: ProgressCallback | None):
        self.stream, self.offer, self.start, self.cb = stream, offer, start, cb
        self.done = start

    def advance(self, n: int) -> None:
        self.done += n
        if self.cb is not None:
            o = self.offer
            self.cb(TransferProgress(o.name, self.stream.peer, self.done, o.size, self.start))


class _Sink:
    """Hashes and writes received bytes in a worker thread."""

    def __init__(self, f: BinaryIO, h: Any) -> None:
        self.f = f
        self.h = h

    def _write(self, data: bytes) -> None:
        self.h.update(data)
        self.f.write(data)

    async def copy(self, stream: Stream, n: int, progress: _Tracker) -> None:
        """Exactly ``n`` bytes from ``stream``.

        Raises:
            anyio.EndOfStream: the sender ended early.
        """
        while n:
            data = await stream.receive(min(n, CHUNK))
            n -= len(data)
            await anyio.to_thread.run_sync(self._write, data)
            progress.advance(len(data))


def _mode(mode: int, umask: int) -> int:
    return mode & 0o777 & ~umask


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _resume_advice(offer: Offer) -> str:
    if offer.resumable:
        return "receive again with the same capability to resume"
    return "receive again to resume (a one-shot capability needs a new offer: a new `capsock send`)"


async def _finish(stream: Stream, ok: bool, error: str | None = None) -> None:
    result: dict[str, Any] = {"ok": ok} if ok else {"ok": False, "error": error}
    await stream.send(encode(result))
    await goodbye(stream)


async def _decline(stream: Stream, offer: Offer | None, exc: TransferDeclined) -> NoReturn:
    """Tell the sender ``exc.remote`` (never a local path or user name), raise ``exc``."""
    answer: dict[str, Any] = {"decline": exc.remote}
    if exc.retry:
        answer["retry"] = True
    await stream.send(encode(answer))
    await stream.send_eof()
    free = offer is not None and (offer.resumable or (exc.retry and offer.retry_ok))
    if free:
        how = "the capability was not used: fix this, then receive again with the same one"
    else:
        how = "the sender counted this as a use: a one-shot capability now needs a new offer"
    raise TransferDeclined(f"{exc} (declined; {how})", exc.remote, retry=exc.retry)


def _target(output: str | os.PathLike[str] | None, name: str) -> Path:
    if output is None:
        return Path.cwd() / name
    out = Path(output)
    return out / name if out.is_dir() else out


def _ours(place: Place, name: str) -> bool:
    """Whether ``name`` in ``place`` is this user's own regular file or directory."""
    try:
        st = os.lstat(name, dir_fd=place.fd)
    except OSError:
        return False
    kind_ok = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
    return kind_ok and st.st_uid == os.getuid()


async def _open_place(stream: Stream, offer: Offer, target: Path) -> Place:
    """The target's directory, opened once; decline unless ``target`` can be created."""
    try:
        place = Place(target.parent)
    except TransferError as exc:
        await _decline(stream, offer, TransferDeclined(str(exc), _NOT_WRITABLE, retry=True))
    if place.exists(target.name):
        # Our own file or directory: a plain mistake, try again.  Anything else
        # (a link, another user's file) is for the user to look into first.
        retry = _ours(place, target.name)
        place.close()
        local = f"{target} exists: remove it or choose another name with -o"
        await _decline(stream, offer, TransferDeclined(local, _EXISTS, retry=retry))
    have = 0
    if offer.kind == "file":
        try:
            have = os.lstat(target.name + PART_SUFFIX, dir_fd=place.fd).st_size
        except OSError:
            have = 0
    try:
        vfs = os.fstatvfs(place.fd)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        free = None
    need = offer.size - min(have, offer.size)
    if free is not None and need > free:
        place.close()
        local = f"{offer.name} needs {need} bytes, but {target.parent} has {free} free"
        await _decline(stream, offer, TransferDeclined(local, _NO_SPACE, retry=True))
    return place


async def _expect_digest(stream: Stream, h: Any) -> bool:
    done, _ = await read_message(stream)
    return bool(field(done, "sha256", bytes, "digest") == h.digest())


def _hash_fd_prefix(fd: int, n: int) -> Any:
    h = hashlib.sha256()
    pos = 0
    while pos < n:
        data = os.pread(fd, min(CHUNK, n - pos), pos)
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
    start = field(start_msg, "offset", int, "start")
    if start not in (0, offset):
        raise TransferError("the sender chose an offset that was not asked for")
    return int(start)


async def _to_file_object(
    stream: Stream, offer: Offer, out: BinaryIO, cb: ProgressCallback | None
) -> Received:
    h = hashlib.sha256()
    await _exchange_offsets(stream, 0, h)
    progress = _Tracker(stream, offer, 0, cb)
    await _Sink(out, h).copy(stream, offer.size, progress)
    await anyio.to_thread.run_sync(out.flush)
    if not await _expect_digest(stream, h):
        await _finish(stream, False, "SHA-256 mismatch")
        raise TransferIntegrityError(
            f"{offer.name}: the SHA-256 of the received data differs from the sender's"
        )
    await _finish(stream, True)
    return Received(offer, None, 0, offer.size)


async def _receive_file(
    stream: Stream, offer: Offer, target: Path, cb: ProgressCallback | None, say: Report
) -> Received:
    place = await _open_place(stream, offer, target)
    try:
        part_name = target.name + PART_SUFFIX
        try:
            fd, resumed = place.open_part(part_name)
        except UnsafeTarget as exc:
            await _decline(stream, offer, TransferDeclined(str(exc), exc.remote))
        with os.fdopen(fd, "r+b") as f:
            progress = await _fill_part(stream, offer, place, part_name, f, resumed, cb, say)
            os.fchmod(fd, _mode(offer.mode, _umask()))
            os.utime(fd, (offer.mtime, offer.mtime))
            os.fsync(fd)
            try:
                place.rename_noreplace(part_name, target.name, fd)
            except (OSError, TransferError) as exc:
                await _finish(stream, False, _NOT_PLACED)
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise TransferError(
                    f"{offer.name} was received and verified, but cannot become {target} "
                    f"({why}); it is kept as {place.path / part_name}"
                ) from None
    finally:
        place.close()
    await _finish(stream, True)
    return Received(offer, target, progress.start, progress.done - progress.start)


async def _fill_part(
    stream: Stream,
    offer: Offer,
    place: Place,
    part_name: str,
    f: BinaryIO,
    resumed: bool,
    cb: ProgressCallback | None,
    say: Report,
) -> _Tracker:
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
        say(f"resuming {offer.name} at {offset} of {size} bytes")
    elif offset:
        say(f"the partial {part} is not a part of the offered {offer.name}: starting over")
        h = hashlib.sha256()
    elif have:
        say(f"the partial {part} is longer than the offered {offer.name}: starting over")
    progress = _Tracker(stream, offer, start, cb)
    f.truncate(start)
    f.seek(start)
    try:
        await _Sink(f, h).copy(stream, size - start, progress)
    except (anyio.EndOfStream, *STREAM_ERRORS) as exc:
        why = "the sender ended the stream" if isinstance(exc, anyio.EndOfStream) else exc
        raise TransferError(
            f"the transfer stopped at {progress.done} of {size} bytes ({why}); {part} is "
            f"kept: {_resume_advice(offer)}"
        ) from None
    except anyio.get_cancelled_exc_class():  # Ctrl-C, SIGTERM
        say(f"{part} is kept ({progress.done} of {size} bytes): {_resume_advice(offer)}")
        raise
    f.flush()
    if not await _expect_digest(stream, h):
        place.remove_part(part_name, fd)
        await _finish(stream, False, "SHA-256 mismatch")
        raise TransferIntegrityError(
            f"{offer.name}: the SHA-256 of the received data differs from the sender's; "
            "the partial file was removed: receive it again"
        )
    return progress


async def _receive_dir(
    stream: Stream, offer: Offer, target: Path, cb: ProgressCallback | None, say: Report
) -> Received:
    place = await _open_place(stream, offer, target)
    try:
        part_name = target.name + PART_SUFFIX
        if place.exists(part_name):
            say(
                f"removing the partial {place.path / part_name} of an earlier attempt "
                "(directories start over)"
            )
        try:
            top = place.fresh_dir(part_name)
        except UnsafeTarget as exc:
            await _decline(stream, offer, TransferDeclined(str(exc), exc.remote))
        try:
            progress = await _fill_dir(stream, offer, top, cb)
            place.rename_noreplace(part_name, target.name, top)
        except (OSError, UnsafeTarget) as exc:
            place.remove_tree(part_name, top)
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            await _finish(stream, False, _NOT_PLACED)
            raise TransferError(
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
    return Received(offer, target, 0, progress.done)


async def _fill_dir(
    stream: Stream, offer: Offer, top: int, cb: ProgressCallback | None
) -> _Tracker:
    """Receive every ENTRY below the directory ``top``, check the digest, set the modes.

    Raises:
        OSError / UnsafeTarget: only when setting the modes failed, after the check.
    """
    await stream.send(encode({"offset": 0}))
    start_msg, _ = await read_message(stream)
    if field(start_msg, "offset", int, "start") != 0:
        raise TransferError("the sender chose an offset that was not asked for")
    umask = _umask()
    h = hashlib.sha256()
    progress = _Tracker(stream, offer, 0, cb)
    dirs: list[tuple[list[str], int]] = []
    try:
        for _ in range(offer.entries + 1):
            header, raw = await read_message(stream)
            if "sha256" in header:
                break
            h.update(raw)
            await _receive_entry(stream, header, top, dirs, umask, offer.size, h, progress)
        else:
            raise TransferError("the sender sent more entries than it offered")
    except (anyio.EndOfStream, *STREAM_ERRORS) as exc:
        why = "the sender ended the stream" if isinstance(exc, anyio.EndOfStream) else exc
        again = "receive it again" + (" with the same capability" if offer.resumable else "")
        raise TransferError(f"the transfer of {offer.name} stopped ({why}); {again}") from None
    except OSError as exc:
        raise TransferError(f"cannot write {offer.name}: {exc.strerror}") from None
    if field(header, "sha256", bytes, "digest") != h.digest():
        await _finish(stream, False, "SHA-256 mismatch")
        raise TransferIntegrityError(
            f"{offer.name}: the SHA-256 of the received data differs from the sender's; "
            "the partial directory was removed: receive it again"
        )
    for parts, mode in reversed(dirs):  # children first: a parent may lose its x bit
        try:
            fd = open_dir_below(top, parts)
        except OSError:
            shown = printable("/".join([offer.name, *parts]))
            raise UnsafeTarget(f"{shown} was replaced while it was being received") from None
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
    progress: _Tracker,
) -> None:
    """One ENTRY of a directory transfer, created below the directory ``top``.

    Raises:
        TransferError: a malformed entry, one sent twice or before its directory.
    """
    rel = safe_relative(header.get("path"))
    parts = rel.split("/")
    kind = header.get("type")
    if kind not in ("dir", "file"):
        raise TransferError(f"the sender sent a malformed entry for {printable(rel)!r}")
    mode = _mode(int_field(header, "mode", MODE_MAX, "entry"), umask)
    try:
        parent = open_dir_below(top, parts[:-1])
    except OSError:
        raise TransferError(f"the sender sent {printable(rel)!r} before its directory") from None
    try:
        if kind == "dir":
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                raise TransferError(f"the sender sent {printable(rel)!r} twice") from None
            dirs.append((parts, mode))
            return
        length = int_field(header, "size", size - progress.done, "entry")
        mtime = time_field(header, "mtime", "entry")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(parts[-1], flags, 0o600, dir_fd=parent)
        except FileExistsError:
            raise TransferError(f"the sender sent {printable(rel)!r} twice") from None
        with os.fdopen(fd, "wb") as f:
            await _Sink(f, h).copy(stream, length, progress)
            f.flush()
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
            os.fsync(fd)
    finally:
        os.close(parent)


async def read_offer(stream: Stream, wait: float) -> Offer:
    """The sender's OFFER, checked (a malformed one is declined).

    Raises:
        NotAnOffer: no offer within ``timeout``, the stream ended, another protocol.
        TransferDeclined: a malformed offer (the sender was told).
    """
    try:
        with anyio.fail_after(wait):
            message, _ = await read_message(stream)
    except TimeoutError:
        raise NotAnOffer(
            f"no offer from the other side within {wait:g} s: the sender is busy with "
            "another receiver (try again), or this is not a `capsock send` capability "
            "(one of `capsock listen` takes `capsock connect URI`)"
        ) from None
    except anyio.EndOfStream:
        raise NotAnOffer(
            "the other side closed the stream without an offer (its capability was used "
            "meanwhile, or it is not a `capsock send` capability)"
        ) from None
    if message.get("proto") != PROTOCOL:
        raise NotAnOffer(
            f"the other side does not speak {PROTOCOL}: this is not a `capsock send` "
            "capability (one of `capsock listen` takes `capsock connect URI`)"
        )
    try:
        return parse_offer(message)
    except TransferDeclined as exc:
        await _decline(stream, None, exc)


async def receive_offer(
    stream: Stream,
    output: str | os.PathLike[str] | BinaryIO | None,
    *,
    wait: float,
    progress: ProgressCallback | None,
    say: Report,
) -> Received:
    """The receiving side of one transfer (see :func:`capsock.transfer.receive_path`)."""
    offer = await read_offer(stream, wait)
    if output is not None and not isinstance(output, str | os.PathLike):
        if offer.kind == "dir":
            await _decline(stream, offer, TransferDeclined(_TO_STDOUT, _TO_STDOUT, retry=True))
        return await _to_file_object(stream, offer, output, progress)
    target = _target(output, offer.name)
    if offer.kind == "file":
        return await _receive_file(stream, offer, target, progress, say)
    return await _receive_dir(stream, offer, target, progress, say)
