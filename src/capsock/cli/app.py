"""The parser, the dispatch, and the one place where failures become exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio

from .. import __version__
from ..errors import (
    CapabilityRejected,
    CapsockError,
    InvalidCapability,
    PeerAuthenticationError,
    Unreachable,
)
from . import caps, completion, manual, pipes, transfer
from .common import (
    CliError,
    Exit,
    add_caveat_options,
    add_dialer_options,
    add_node_options,
    add_relay_timeout_option,
    add_state_dir_option,
    say,
    set_quiet,
    state_home,
    uri_argument,
)
from .demo import demo, run_relay

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        say(f"capsock: error: {message} (see `{self.prog} --help`)")
        raise SystemExit(Exit.USAGE)


def _verbosity() -> argparse.ArgumentParser:
    """-v/-q accepted after the command too (they do not override the ones before it)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
        help="no progress bar and no informational messages (errors still print)",
    )  # fmt: skip
    return common


Commands = dict[str, tuple[argparse.ArgumentParser, str]]


def build_parser() -> tuple[argparse.ArgumentParser, Commands]:
    """The ``capsock`` parser and its subcommands (name -> (parser, one-line help))."""
    parser = _Parser(
        prog="capsock",
        description="Capability-based, end-to-end encrypted byte streams. "
        "stdout carries only data; messages go to stderr. Reference: `capsock help` "
        "(topics such as `capsock help send` or `capsock help exit-codes`; the same "
        "text as docs/cli.md, shipped with the package).",
    )
    parser.add_argument("--version", action="version", version=f"capsock {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=False,
        help="no progress bar and no informational messages (errors still print)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parent: list[argparse.ArgumentParser] = [_verbosity()]
    commands: Commands = {}

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name,
            help=help_,
            description=help_,
            parents=parent,  # type: ignore[arg-type]
        )
        commands[name] = (p, help_)
        return p

    p = command("id", "create (the first time) or show this machine's identity")
    add_state_dir_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = command("listen", "print a capability, then pipe incoming streams to stdout/stdin")
    p.add_argument("--once", action="store_true", help="serve one stream, then exit")
    add_node_options(p, sturdy=True)
    add_relay_timeout_option(p)

    p = command("connect", "open a stream with a capability and pipe it to stdin/stdout")
    p.add_argument("uri", metavar="URI", type=uri_argument, help="the capability (@FILE)")
    add_dialer_options(p)

    p = command("share", "expose a local TCP or Unix-socket service behind a capability")
    p.add_argument("target", metavar="ADDR", help="the service: tcp:HOST:PORT or unix:/PATH")
    add_node_options(p, sturdy=True)
    add_relay_timeout_option(p)

    p = command("forward", "accept local TCP connections and forward each over a capability")
    p.add_argument(
        "uri", metavar="URI", type=uri_argument,
        help="the capability of a `capsock share` (- or @FILE)",
    )  # fmt: skip
    p.add_argument(
        "--listen", default="127.0.0.1:0", metavar="ADDR",
        help="where to accept local connections: HOST:PORT (default 127.0.0.1:0, a free "
        "port; every local user can connect to it) or unix:/PATH (a socket only you can use)",
    )  # fmt: skip
    add_dialer_options(p)

    p = command("send", "offer a file or directory; prints a one-shot capability")
    p.add_argument("path", metavar="PATH", help="the file or directory to send")
    add_node_options(p, sturdy=True)
    add_relay_timeout_option(p)
    for action in p._actions:
        if action.dest == "uses":
            action.help = "let N receivers fetch it (default 1: one-shot)"
        if action.dest == "name":
            action.help = (
                "a sturdy offer: the same URI until every use is complete (a failed "
                "transfer is resumed with it, also after a restart of send; kept in "
                "--state-dir, revoked once complete)"
            )

    p = command("receive", "fetch what `capsock send` offers, verified end to end")
    p.add_argument(
        "uri", metavar="URI", type=uri_argument,
        help="the capability printed by send (- or @FILE)",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output", metavar="PATH",
        help="where to write it (an existing directory: inside it; - for stdout; "
        "default: the sender's name in the current directory)",
    )  # fmt: skip
    add_dialer_options(p)

    p = command("attenuate", "print a weaker capability (offline)")
    p.add_argument("uri", metavar="URI", type=uri_argument, help="the capability (- or @FILE)")
    add_caveat_options(p, uses_help="allow at most N streams")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = command("inspect", "show a capability's node, caveats and hints (never its secret)")
    p.add_argument("uri", metavar="URI", type=uri_argument, help="the capability (- or @FILE)")
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = command("revoke", "revoke a sturdy capability of the node in --state-dir")
    p.add_argument("uri", metavar="URI", type=uri_argument, help="the capability (- or @FILE)")
    add_state_dir_option(p)

    p = command(
        "relay", "run a relay: forward sessions for nodes behind NAT; prints its capability"
    )
    p.add_argument(
        "--listen", action="append", required=True, metavar="tcp:HOST:PORT",
        help="address to accept sessions on (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--advertise", action="append", metavar="tcp:HOST:PORT",
        help="address to put into the relay capability (default: the --listen ones)",
    )  # fmt: skip
    p.add_argument(
        "--state-dir", type=Path, default=None, metavar="DIR",
        help="identity and sturdy capability store (default: $XDG_STATE_HOME/capsock/relay)",
    )  # fmt: skip

    command("demo", "show the point in a few seconds, on this machine")

    p = command("completion", "print a shell completion script")
    p.add_argument(
        "shell", choices=["bash", "zsh", "fish"], metavar="SHELL", help="bash, zsh or fish"
    )

    p = command("help", "show the CLI reference, or one topic of it (a command, exit-codes)")
    p.add_argument(
        "topic", nargs="?", metavar="TOPIC",
        help="a command name, exit-codes, conventions, ...; all for everything",
    )  # fmt: skip
    return parser, commands


# ------------------------------------------------------------------ failures


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _failure(exc: BaseException, verbose: int) -> int:
    """Print one error line for ``exc`` (a leaf or a group); return the exit code."""
    leaves = list(_leaves(exc))
    if any(isinstance(e, Terminated) for e in leaves):
        say("capsock: terminated")
        return Exit.TERMINATED
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        say("capsock: interrupted")
        return Exit.INTERRUPTED
    ranked = sorted(leaves, key=lambda e: 0 if isinstance(e, CliError | CapsockError) else 1)
    leaf = ranked[0]
    code: int = Exit.ERROR
    message = _one_line(leaf)
    if isinstance(leaf, CliError):
        code = leaf.code
    elif isinstance(leaf, InvalidCapability):
        code, message = Exit.USAGE, f"invalid capability: {message}"
    elif isinstance(leaf, CapabilityRejected):
        code = Exit.REFUSED
    elif isinstance(leaf, PeerAuthenticationError | Unreachable):
        code = Exit.UNREACHABLE
    elif isinstance(leaf, CapsockError):
        pass  # its message says what happened and what to do
    elif isinstance(leaf, TimeoutError):
        message = "timed out waiting for the other side; check that it is still running"
    elif isinstance(leaf, OSError):
        where = f" ({leaf.filename})" if leaf.filename else ""
        message = f"{leaf.strerror or message}{where}"
    elif isinstance(leaf, anyio.BrokenResourceError | anyio.EndOfStream):
        message = "the connection ended unexpectedly"
    elif not isinstance(leaf, SystemExit):
        message = f"internal error: {type(leaf).__name__}: {message} (run with -v for details)"
        if verbose:
            traceback.print_exception(leaf, file=sys.stderr)
    if isinstance(leaf, SystemExit):
        return int(leaf.code or 0)
    say(f"capsock: error: {message}")
    return code


def _check_stdin_uses(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """At most one URI-valued argument may be ``-``: stdin has one first line."""
    dashes = []
    for action in parser._actions:
        if action.type is uri_argument:
            value = getattr(args, action.dest, None)
            values = value if isinstance(value, list) else [value]
            dashes += [action.metavar or action.dest for v in values if v == "-"]
    if len(dashes) > 1:
        raise CliError(
            "only one capability can be read from stdin (-): pass the others as @FILE",
            Exit.USAGE,
        )


def _dispatch(args: argparse.Namespace, top: argparse.ArgumentParser, commands: Commands) -> int:
    name = args.command
    _check_stdin_uses(args, commands[name][0])
    if name == "demo":
        return _run(demo)
    if name == "relay":
        state = args.state_dir or state_home() / "relay"
        return _run(run_relay, args.listen, args.advertise, state)
    if name == "completion":
        make = {
            "bash": completion.bash_script,
            "zsh": completion.zsh_script,
            "fish": completion.fish_script,
        }[args.shell]
        print(make(top, commands), end="", flush=True)
        return Exit.OK
    if name == "help":
        return manual.cmd_help(args.topic)
    sync: dict[str, Callable[[argparse.Namespace], int]] = {
        "id": caps.cmd_id,
        "attenuate": caps.cmd_attenuate,
        "inspect": caps.cmd_inspect,
    }
    if name in sync:
        return sync[name](args)
    run: dict[str, Callable[[argparse.Namespace], Any]] = {
        "listen": pipes.cmd_listen,
        "connect": pipes.cmd_connect,
        "share": pipes.cmd_share,
        "forward": pipes.cmd_forward,
        "send": transfer.cmd_send,
        "receive": transfer.cmd_receive,
        "revoke": caps.cmd_revoke,
    }
    return _run(run[name], args)


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (streams reset, sessions closed), exit code 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _run(command: Callable[..., Awaitable[int]], *args: Any) -> int:
    """Run an async command; SIGINT and SIGTERM cancel it from inside the event loop.

    A Python signal handler that raises runs wherever the main thread happens to
    be: in some other task, or halfway through a cancel scope's bookkeeping,
    which anyio then reports as a RuntimeError instead of a clean stop. So while
    the loop runs, the signals are received as messages and turned into a
    cancellation of the command; the exception (exit code 130 or 143) is raised
    once the loop is gone. A second signal during the shutdown takes the
    default action (Ctrl-C raises at once; SIGTERM kills the process)."""
    received: list[int] = []

    async def guarded() -> int:
        result: int = Exit.ERROR
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        received.append(signum)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            result = await command(*args)
            tg.cancel_scope.cancel()
        return result

    try:
        result: int = anyio.run(guarded)
    except BaseException:
        if not received:
            raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)  # the loop left SIG_DFL behind
    if received:
        raise Terminated if received[0] == signal.SIGTERM else KeyboardInterrupt
    return result


def _occupy_standard_fds() -> None:
    """Open /dev/null on a closed stdin/stdout/stderr (``<&-``), so that no socket
    or file opened later lands on fd 0-2 and gets data meant for the terminal."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``capsock`` command; returns the exit code (see docs/cli.md)."""
    _occupy_standard_fds()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    set_quiet(bool(getattr(args, "quiet", False)))
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, stream=sys.stderr, format="capsock: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return Exit.USAGE
    try:
        return int(_dispatch(args, parser, commands))
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
        return _failure(exc, verbose)
