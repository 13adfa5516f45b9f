"""Creating files where other users may also create files: the receiving side's file system.

A receive directory may be shared (``/tmp``, a group directory): whoever can
create files there can plant a symbolic link or a hard link where ``receive``
is about to write, hoping that it writes through it into one of the receiving
user's own files.  So every file and directory ``receive`` creates, truncates,
changes or renames is reached by a name *inside a directory descriptor opened
once* (``openat`` and friends), with ``O_NOFOLLOW`` (and ``O_EXCL`` when it is
new), and changed through its own descriptor (``fchmod``, ``futimens``,
``fsync``).  A partial file is only resumed if it is a regular file of this
user with a single link.  The final rename never replaces anything
(``renameat2(RENAME_NOREPLACE)``, or a check right before the rename where the
file system does not offer it).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path

from ._wire import TransferError, UnsafeTarget

__all__ = ["Place", "open_dir_below", "rename_noreplace"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1


def _libc_renameat2() -> object | None:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_renameat2 = _libc_renameat2()


def rename_noreplace(dirfd: int, src: str, dst: str) -> None:
    """Rename ``src`` to ``dst`` inside the directory ``dirfd``; never replace ``dst``.

    Raises:
        FileExistsError: something is at ``dst`` already.
        OSError: the rename failed.
    """
    if callable(_renameat2):
        ok = _renameat2(dirfd, os.fsencode(src), dirfd, os.fsencode(dst), _RENAME_NOREPLACE)
        if ok == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    # No RENAME_NOREPLACE here: check, then rename (a small window, on such systems only).
    try:
        os.lstat(dst, dir_fd=dirfd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)


def _check_ours(st: os.stat_result, shown: Path, *, directory: bool) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeTarget(
            f"{shown} is a symbolic link; capsock never writes through links: remove it "
            "(and check who put it there)"
        )
    if directory and not stat.S_ISDIR(st.st_mode):
        raise UnsafeTarget(f"{shown} is not a directory: remove it, or choose another name with -o")
    if not directory and not stat.S_ISREG(st.st_mode):
        raise UnsafeTarget(f"{shown} is not a regular file: remove it, or choose another name")
    if st.st_uid != os.getuid():
        raise UnsafeTarget(
            f"{shown} belongs to another user (uid {st.st_uid}); capsock writes only into "
            "files of its own: remove it (and check who put it there)"
        )
    if not directory and st.st_nlink != 1:
        raise UnsafeTarget(
            f"{shown} has {st.st_nlink} hard links; capsock writes only into a file with "
            "one: remove it (and check who linked it)"
        )


def _unsafe_open(exc: OSError, shown: Path) -> UnsafeTarget:
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return UnsafeTarget(
            f"{shown} is a symbolic link; capsock never writes through links: remove it "
            "(and check who put it there)"
        )
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENXIO):
        return UnsafeTarget(f"{shown} is not a regular file: remove it, or choose another name")
    return UnsafeTarget(f"cannot write {shown}: {exc.strerror}")


class Place:
    """A directory, opened once, in which ``receive`` creates its target.

    Raises (constructor):
        TransferError: the directory cannot be opened.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory
        try:
            self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise TransferError(
                f"cannot write into {directory}: {exc.strerror}; create it, or fix -o"
            ) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def exists(self, name: str) -> bool:
        """Whether anything (a dangling link included) is at ``name``."""
        try:
            os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def inode(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.lstat(name, dir_fd=self.fd)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def open_part(self, name: str) -> tuple[int, bool]:
        """Open the partial file ``name`` for writing: ``(fd, resumed)``.

        An existing one is used only if it is our own regular file with one link;
        otherwise a new one is created exclusively (mode 0600).

        Raises:
            UnsafeTarget: something else is there.
        """
        shown = self.path / name
        try:
            fd = os.open(
                name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd
            )
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _unsafe_open(exc, shown) from None
        else:
            try:
                _check_ours(os.fstat(fd), shown, directory=False)
            except BaseException:
                os.close(fd)
                raise
            return fd, True
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.fd,
            )
        except OSError as exc:
            raise _unsafe_open(exc, shown) from None
        return fd, False

    def remove_part(self, name: str, fd: int) -> None:
        """Unlink ``name`` if it still is the file open as ``fd``."""
        st = os.fstat(fd)
        if self.inode(name) == (st.st_dev, st.st_ino):
            os.unlink(name, dir_fd=self.fd)

    def fresh_dir(self, name: str) -> int:
        """Create ``name`` (mode 0700), after removing our own earlier one; its descriptor.

        Raises:
            UnsafeTarget: a link, a file, or another user's directory is there.
        """
        shown = self.path / name
        try:
            st = os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        else:
            _check_ours(st, shown, directory=True)
            shutil.rmtree(name, dir_fd=self.fd)
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _unsafe_open(exc, shown) from None
        _check_ours(os.fstat(fd), shown, directory=True)
        return fd

    def remove_tree(self, name: str, fd: int) -> None:
        """Remove the directory ``name`` if it still is the one open as ``fd``."""
        st = os.fstat(fd)
        if self.inode(name) == (st.st_dev, st.st_ino):
            shutil.rmtree(name, ignore_errors=True, dir_fd=self.fd)

    def rename_noreplace(self, src: str, dst: str, fd: int) -> None:
        """Rename ``src`` (still the file or directory open as ``fd``) to ``dst``.

        Raises:
            UnsafeTarget: ``src`` was replaced meanwhile.
            FileExistsError: ``dst`` appeared meanwhile.
        """
        st = os.fstat(fd)
        if self.inode(src) != (st.st_dev, st.st_ino):
            raise UnsafeTarget(f"{self.path / src} was replaced while it was being received")
        rename_noreplace(self.fd, src, dst)


def open_dir_below(top: int, parts: list[str]) -> int:
    """The descriptor of directory ``top/parts...``, no link followed on the way.

    Raises:
        OSError: a component is missing, a link, or not a directory.
    """
    fd = os.dup(top)
    try:
        for part in parts:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd
