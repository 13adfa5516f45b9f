"""The state directory: checked before use, locked by one process, files never through links.

A state directory holds a node's private key (``node.key``) and its root keys
(``capabilities.sqlite3``), so whoever can write into it can replace or read
them.  Before a node uses one, :func:`prepare` makes sure it is a real
directory (not a symbolic link) owned by this user, and that nobody else can
write into it:

- missing: created with mode 0700 (parents as needed);
- ours, but group or others have any access: tightened to 0700 (through the
  directory's descriptor, never through a path that might have changed);
- owned by another user, a symbolic link, or not a directory: refused with a
  :class:`~capsock.errors.LocalUsageError` that says what to do.

The files inside are opened with ``O_NOFOLLOW``: a symbolic link planted at
``lock``, ``node.key`` or ``capabilities.sqlite3`` is refused, never followed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from .errors import LocalUsageError

__all__ = ["lock", "lock_holder", "prepare", "private_file", "unlock"]

LOCK_NAME = "lock"


def _refuse_link(path: Path, exc: OSError) -> LocalUsageError:
    if exc.errno == errno.ELOOP:
        return LocalUsageError(
            f"{path} is a symbolic link; capsock does not follow links in its state "
            "directory: remove it (and check who planted it)"
        )
    return LocalUsageError(f"cannot open {path}: {exc.strerror}")


def prepare(directory: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Check (and with ``create``, make) a private state directory; return its path.

    Raises:
        LocalUsageError: the directory is a symbolic link, not a directory,
            owned by another user, or cannot be created or opened.
    """
    path = Path(directory)
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise LocalUsageError(
                f"cannot create the state directory {path}: {exc.strerror}"
            ) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise LocalUsageError(
                f"the state directory {path} is a symbolic link; capsock does not follow "
                "it: pass the real directory with --state-dir (or state_dir=)"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise LocalUsageError(f"the state directory {path} is not a directory") from None
        raise LocalUsageError(f"cannot open the state directory {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise LocalUsageError(
                f"the state directory {path} belongs to another user (uid {st.st_uid}); "
                "it holds private keys, so capsock uses only a directory of its own: "
                "pass another --state-dir (or state_dir=)"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            # Ours: nobody else should be able to look in or plant files; fix it.
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def private_file(path: str | os.PathLike[str]) -> None:
    """Make sure ``path`` is a regular file of ours with mode 0600 (create it if missing).

    Raises:
        LocalUsageError: it is a symbolic link, not a regular file, or another user's.
    """
    target = Path(path)
    try:
        fd = os.open(
            target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise _refuse_link(target, exc) from None
    try:
        _check_own_regular(fd, target)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _check_own_regular(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise LocalUsageError(f"{path} is not a regular file: remove it")
    if st.st_uid != os.getuid():
        raise LocalUsageError(
            f"{path} belongs to another user (uid {st.st_uid}): remove it (and check who "
            "put it there)"
        )


def lock(directory: str | os.PathLike[str]) -> int:
    """Hold an exclusive lock on ``directory/lock`` (the caller keeps the descriptor).

    Raises:
        LocalUsageError: another process (or Node) holds the state directory, or
            ``lock`` is a symbolic link or not our regular file.
    """
    state = Path(directory)
    path = state / LOCK_NAME
    try:
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise _refuse_link(path, exc) from None
    try:
        _check_own_regular(fd, path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except LocalUsageError:
        os.close(fd)
        raise
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise LocalUsageError(
            f"state directory {state} is in use by another capsock node (pid {holder}); "
            "one state directory belongs to one process: give each node its own"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(fd: int) -> None:
    """Release a lock taken with :func:`lock`."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def lock_holder(directory: str | os.PathLike[str]) -> str | None:
    """The pid (text) of the process holding ``directory``'s lock, or None if it is free.

    A missing, linked or unreadable lock file counts as free: :func:`lock`
    then reports what is wrong with it.
    """
    try:
        fd = os.open(
            Path(directory) / LOCK_NAME,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
