"""`capsock receive` in a directory where someone else can create files.

The attacker plants symbolic links, hard links or files of their own where the
receiver is about to write (before the transfer, or while it runs: the
hand-made sender of ``send_peer`` acts at exactly the right moment).  Every
time the victim file or directory stays as it was (content, mode, mtime),
the receive fails with one clear error line (exit code 1), and what the sender
is told carries no local path.
"""

from __future__ import annotations

import getpass
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.send_peer import (
    dir_sender,
    error_line,
    file_sender,
    receive_from,
    snapshot,
    wait_for,
)
from tests.test_cli import Cli

DATA = os.urandom(200_000)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of the receiving user's that an attacker would like changed."""
    path = tmp_path / "home" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(b"precious\n" * 100)
    path.chmod(0o600)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


@pytest.fixture
def victim_dir(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "project"
    path.mkdir(parents=True)
    (path / "keep.txt").write_bytes(b"keep")
    path.chmod(0o700)
    return path


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "shared"
    path.mkdir()
    return path


def _no_local_path(text: object, tmp_path: Path) -> None:
    shown = str(text)
    assert str(tmp_path) not in shown, shown
    assert str(Path.home()) not in shown or str(Path.home()) == "/", shown
    assert f"/{getpass.getuser()}/" not in shown, shown


def _send(cli: Cli, tmp_path: Path, name: str = "data.bin") -> Any:
    source = tmp_path / name
    source.write_bytes(DATA)
    proc = cli.start("send", source, "--uri-file", "send.uri")
    cli.wait_file(tmp_path / "send.uri", proc)
    return proc


# ------------------------------------------------------------------ planted before the transfer


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_planted_part_link_is_refused_and_its_target_untouched(
    cli: Cli, tmp_path: Path, dest: Path, victim: Path, dangling: bool
) -> None:
    aim = tmp_path / "home" / "created-by-receive" if dangling else victim
    before = snapshot(victim)
    (dest / "data.bin.capsock-part").symlink_to(aim)
    send = _send(cli, tmp_path)
    result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
    assert snapshot(victim) == before
    assert result.returncode == 1
    assert "symbolic link" in error_line(result.stderr)
    assert not (tmp_path / "home" / "created-by-receive").exists()
    assert not (dest / "data.bin").exists()
    assert (dest / "data.bin.capsock-part").is_symlink()  # left for the user to inspect
    _, err = send.communicate(timeout=30)
    assert send.returncode == 1
    _no_local_path(err.decode(), tmp_path)


def test_a_hard_linked_part_file_is_refused(
    cli: Cli, tmp_path: Path, dest: Path, victim: Path
) -> None:
    before = snapshot(victim)
    os.link(victim, dest / "data.bin.capsock-part")
    send = _send(cli, tmp_path)
    result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
    assert snapshot(victim)[:2] == before[:2]
    assert result.returncode == 1
    assert "hard links" in error_line(result.stderr)
    assert not (dest / "data.bin").exists()
    send.communicate(timeout=30)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a file of another user")
def test_a_part_file_of_another_user_is_refused(cli: Cli, tmp_path: Path, dest: Path) -> None:
    part = dest / "data.bin.capsock-part"
    part.write_bytes(DATA[:1000])
    part.chmod(0o666)
    os.chown(part, 54321, 54321)
    send = _send(cli, tmp_path)
    result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
    assert result.returncode == 1
    assert "another user" in error_line(result.stderr)
    assert part.read_bytes() == DATA[:1000]
    assert not (dest / "data.bin").exists()
    send.communicate(timeout=30)


def test_a_planted_target_link_is_declined_without_local_paths(
    cli: Cli, tmp_path: Path, dest: Path, victim: Path
) -> None:
    before = snapshot(victim)
    (dest / "data.bin").symlink_to(victim)
    send = _send(cli, tmp_path)
    result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert str(dest / "data.bin") in line  # the receiving user is told where
    assert snapshot(victim) == before
    _, err = send.communicate(timeout=30)
    assert "declined" in err.decode()
    _no_local_path(err.decode(), tmp_path)  # the sender is not


def test_a_planted_directory_part_link_is_refused(
    cli: Cli, tmp_path: Path, dest: Path, victim_dir: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_bytes(b"new")
    (dest / "tree.capsock-part").symlink_to(victim_dir)
    before = snapshot(victim_dir)
    send = cli.start("send", tree, "--uri-file", "send.uri")
    cli.wait_file(tmp_path / "send.uri", send)
    result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
    assert result.returncode == 1
    assert "symbolic link" in error_line(result.stderr)
    assert snapshot(victim_dir) == before
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]
    send.communicate(timeout=30)


# ------------------------------------------------------------------ planted while it runs


@pytest.mark.anyio
async def test_a_part_file_swapped_for_a_link_mid_transfer(
    tmp_path: Path, dest: Path, victim: Path
) -> None:
    before = snapshot(victim)
    part = dest / "x.bin.capsock-part"

    async def attack() -> None:
        if part.exists():
            part.rename(dest / "moved-away")
        part.symlink_to(victim)

    sender = file_sender(DATA, after_request=attack)
    result, answer = await receive_from(sender, tmp_path, cwd=dest)
    assert snapshot(victim) == before
    assert result.returncode == 1, result.stderr
    assert "replaced" in error_line(result.stderr)
    assert not (dest / "x.bin").exists()
    assert isinstance(answer, dict) and answer["ok"] is False
    _no_local_path(answer, tmp_path)


@pytest.mark.anyio
async def test_a_target_planted_mid_transfer_is_not_replaced(
    tmp_path: Path, dest: Path, victim: Path
) -> None:
    before = snapshot(victim)

    def attack() -> None:
        (dest / "x.bin").symlink_to(victim)

    result, answer = await receive_from(file_sender(DATA, after_request=attack), tmp_path, cwd=dest)
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert "cannot become" in line and "x.bin.capsock-part" in line
    assert (dest / "x.bin").is_symlink()  # never replaced: not even the planted link
    assert snapshot(victim) == before
    assert (dest / "x.bin.capsock-part").read_bytes() == DATA  # the verified data is kept
    assert isinstance(answer, dict) and answer["ok"] is False
    _no_local_path(answer, tmp_path)


def _tree_entries() -> list[tuple[dict[str, Any], bytes | None]]:
    return [
        ({"path": "sub", "type": "dir", "mode": 0o777}, None),
        ({"path": "sub/f.txt", "type": "file", "mode": 0o666, "size": 3, "mtime": 5.0}, b"new"),
        ({"path": "top.txt", "type": "file", "mode": 0o666, "size": 4, "mtime": 5.0}, b"top!"),
    ]


def _unchanged_dir(victim_dir: Path, before: tuple[bytes | None, int, int]) -> None:
    assert snapshot(victim_dir) == before
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep.txt"]
    assert (victim_dir / "keep.txt").read_bytes() == b"keep"


@pytest.mark.anyio
async def test_a_directory_part_swapped_for_a_link_mid_transfer(
    tmp_path: Path, dest: Path, victim_dir: Path
) -> None:
    before = snapshot(victim_dir)
    part = dest / "tree.capsock-part"

    async def attack() -> None:
        await wait_for(part)
        part.rename(dest / "moved-away")
        part.symlink_to(victim_dir)

    sender = dir_sender(_tree_entries(), before_entry={0: attack})
    result, _ = await receive_from(sender, tmp_path, cwd=dest)
    _unchanged_dir(victim_dir, before)
    assert result.returncode == 1, result.stderr
    assert "replaced" in error_line(result.stderr)
    assert not (dest / "tree").exists()


@pytest.mark.anyio
async def test_a_subdirectory_swapped_for_a_link_mid_transfer(
    tmp_path: Path, dest: Path, victim_dir: Path
) -> None:
    before = snapshot(victim_dir)
    sub = dest / "tree.capsock-part" / "sub"

    async def attack() -> None:
        await wait_for(sub)
        sub.rename(dest / "moved-away")
        sub.symlink_to(victim_dir)

    entries = _tree_entries()
    sender = dir_sender([entries[0], entries[2]], before_entry={1: attack})
    result, _ = await receive_from(sender, tmp_path, cwd=dest)
    _unchanged_dir(victim_dir, before)
    assert result.returncode == 1, result.stderr
    assert "replaced" in error_line(result.stderr)
    assert not (dest / "tree").exists()
    assert not (dest / "tree.capsock-part").exists()  # removed, without following the link


@pytest.mark.anyio
async def test_a_file_entry_through_a_swapped_subdirectory_is_refused(
    tmp_path: Path, dest: Path, victim_dir: Path
) -> None:
    before = snapshot(victim_dir)
    sub = dest / "tree.capsock-part" / "sub"

    async def attack() -> None:
        await wait_for(sub)
        sub.rmdir()
        sub.symlink_to(victim_dir)

    sender = dir_sender(_tree_entries(), before_entry={1: attack})
    result, _ = await receive_from(sender, tmp_path, cwd=dest)
    assert result.returncode == 1, result.stderr
    assert "before its directory" in error_line(result.stderr)
    _unchanged_dir(victim_dir, before)


@pytest.mark.anyio
async def test_received_files_get_the_offered_mode_and_time(tmp_path: Path, dest: Path) -> None:
    """The good path of the descriptor-based writes: modes, times, content, no part left."""
    result, answer = await receive_from(dir_sender(_tree_entries()), tmp_path, cwd=dest)
    assert result.returncode == 0, result.stderr
    assert answer == {"ok": True}
    umask = os.umask(0o022)
    os.umask(umask)
    tree = dest / "tree"
    assert (tree / "sub" / "f.txt").read_bytes() == b"new"
    assert stat.S_IMODE((tree / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tree / "top.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(tree.stat().st_mode) == 0o755 & ~umask
    assert (tree / "top.txt").stat().st_mtime == 5.0
    assert not (dest / "tree.capsock-part").exists()


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
def test_the_final_rename_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    from capsock.transfer import _files as files

    if not native:
        monkeypatch.setattr(files, "_renameat2", None)
    (tmp_path / "part").write_bytes(b"new")
    (tmp_path / "target").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "dir-target").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for existing in ("target", "dir-target"):
            with pytest.raises(FileExistsError):
                files.rename_noreplace(fd, "part", existing)
        files.rename_noreplace(fd, "part", "free")
    finally:
        os.close(fd)
    assert (tmp_path / "target").is_symlink() and (tmp_path / "dir-target").is_dir()
    assert (tmp_path / "free").read_bytes() == b"new" and not (tmp_path / "part").exists()


# ------------------------------------------------------------------ the sending side


@pytest.mark.parametrize("swap", ["file", "subdirectory"])
def test_send_never_follows_a_link_swapped_into_the_tree(
    cli: Cli, tmp_path: Path, dest: Path, swap: str
) -> None:
    """`send DIR` skips links; one put in place of a file or a subdirectory after the
    scan must not make it send a file of the sender's that it never offered."""
    secret = tmp_path / "home" / "secret"
    secret.mkdir(parents=True)
    (secret / "f.txt").write_bytes(b"SECRET" * 1000)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_bytes(b"harmless")
    send = cli.start("send", tree, "--uri-file", "send.uri")
    cli.wait_file(tmp_path / "send.uri", send)
    if swap == "file":
        (tree / "sub" / "f.txt").unlink()
        (tree / "sub" / "f.txt").symlink_to(secret / "f.txt")
    else:
        (tree / "sub").rename(tmp_path / "moved")
        (tree / "sub").symlink_to(secret)
    result = cli.run("receive", f"@{tmp_path / 'send.uri'}", cwd=dest)
    assert result.returncode != 0
    for path in dest.rglob("*"):
        assert not path.is_file() or b"SECRET" not in path.read_bytes()
    _, err = send.communicate(timeout=30)
    assert send.returncode == 1
    assert "changed while it was being sent" in err.decode()
