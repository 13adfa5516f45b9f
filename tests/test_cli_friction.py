"""Issue 18, section 3: the CLI friction list (items 3, 4, 6, 7, 8, 10, 11).

CLI cases run ``python -m capsock`` as real subprocesses on loopback, with the
``Cli`` runner of tests/test_cli.py; the endpoint's log is checked in-process.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import anyio
import pytest

import capsock
from capsock.cli import Exit, build_parser
from capsock.keys import KeyPair, NodeId
from capsock.uri import Capability, ViaHint

from .test_cli import Cli, free_port, offline_capability, one_line_error, read_stderr_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def expired(cap: Capability) -> Capability:
    """``cap`` with an ``exp`` caveat that ran out a minute ago."""
    return cap.attenuate(ttl=1, now=time.time() - 60)


# ------------------------------------------------------------------ 3. revoked sturdy names


def test_docs_say_a_revoked_sturdy_name_gets_a_fresh_capability() -> None:
    """The code mints a fresh root under a revoked name (that is intended: a
    name is how a service finds its listener again, and a revoked capability
    can never work); the docs said the name kept returning the revoked one."""
    caps = " ".join((DOCS / "capabilities.md").read_text().split())
    assert "keeps returning that same, revoked capability" not in caps
    assert "issues a fresh root capability under the same name" in caps
    decisions = " ".join((DOCS / "decisions.md").read_text().split())
    assert "the name keeps returning it" not in decisions


def test_revoking_a_sturdy_root_and_listening_again_gives_a_new_uri(
    cli: Cli, tmp_path: Path
) -> None:
    state = tmp_path / "alice"
    port = free_port()
    args = ("listen", "--name", "svc", "--state-dir", state, "--listen", f"127.0.0.1:{port}")
    listen = cli.start(*args, "--uri-file", "uri")
    old = cli.wait_file(tmp_path / "uri", listen)
    cli.stop(listen)
    revoked = cli.run("revoke", old, "--state-dir", state)
    assert revoked.returncode == 0, revoked.stderr.decode()
    assert b"prints a new one to hand out" in revoked.stderr
    (tmp_path / "uri").unlink()
    (tmp_path / "yes").write_bytes(b"")
    with (tmp_path / "yes").open("rb") as stdin:
        listen = cli.start(*args, "--uri-file", "uri", stdin=stdin)
    new = cli.wait_file(tmp_path / "uri", listen)
    assert Capability.parse(new).token != Capability.parse(old).token
    refused = cli.run("connect", old, input=b"no")
    assert refused.returncode == Exit.REFUSED, refused.stderr.decode()
    allowed = cli.run("connect", new, input=b"yes")
    assert allowed.returncode == 0, allowed.stderr.decode()
    out, _ = cli.stop(listen)
    assert out == b"yes"


# ------------------------------------------------------------------ 4. local checks


@pytest.mark.parametrize("command", ["connect", "receive"])
def test_an_expired_capability_is_refused_before_dialing(cli: Cli, command: str) -> None:
    # Nothing listens at its address: before the fix this dialed and exited 5.
    cap = expired(offline_capability())
    result = cli.run(command, str(cap))
    assert result.returncode == Exit.REFUSED, result.stderr.decode()
    line = one_line_error(result.stderr)
    assert "nothing was dialed" in line and "expired at" in line and "this machine's clock" in line
    assert cap.token.encode().hex() not in line


def test_forward_refuses_an_expired_capability_before_it_listens(cli: Cli) -> None:
    cap = expired(offline_capability())
    proc = cli.start("forward", str(cap), "--listen", f"127.0.0.1:{free_port()}")
    try:
        _, err = proc.communicate(timeout=30)  # the old code listened on and on
    except subprocess.TimeoutExpired:
        pytest.fail("forward started with an expired capability")
    assert proc.returncode == Exit.REFUSED, err.decode()
    assert "expired at" in one_line_error(err)


def test_a_capability_bound_to_another_peer_is_refused_before_dialing(
    cli: Cli, tmp_path: Path
) -> None:
    bob = NodeId.parse(cli.run("id", "--state-dir", "bob").stdout.decode().strip())
    carol = cli.run("id", "--state-dir", "carol").stdout.decode().strip()
    cap = offline_capability().attenuate(peer=bob)
    for extra, who in [
        (("--state-dir", "carol"), f"the identity in carol ({carol[:12]}...)"),
        (("--state-dir", "bob", "--ephemeral"), "a fresh identity (--ephemeral)"),
        (("--state-dir", "nobody"), "a fresh identity (there is none in nobody)"),
    ]:
        result = cli.run("connect", str(cap), *extra)
        assert result.returncode == Exit.REFUSED, (extra, result.stderr.decode())
        line = one_line_error(result.stderr)
        assert f"bound to node {bob.short()}..." in line and who in line, line
        assert "nothing was dialed" in line
    # The identity it names passes the local check and dials (nobody is there).
    ok = cli.run("connect", str(cap), "--state-dir", "bob")
    assert ok.returncode == Exit.UNREACHABLE, ok.stderr.decode()
    both = offline_capability().attenuate(peer=bob).attenuate(peer=KeyPair.generate().node_id)
    result = cli.run("receive", str(both), "--state-dir", "bob")
    assert result.returncode == Exit.REFUSED
    assert "two different nodes" in one_line_error(result.stderr)


def test_listen_refuses_an_expired_relay_capability_before_dialing(cli: Cli) -> None:
    relay = expired(offline_capability())
    proc = cli.start("listen", "--relay", str(relay))
    try:
        _, err = proc.communicate(timeout=30)  # the old code kept trying the relay
    except subprocess.TimeoutExpired:
        pytest.fail("listen kept trying an expired relay capability")
    assert proc.returncode == Exit.REFUSED, err.decode()
    assert one_line_error(err).startswith("capsock: error: --relay: refused here")


# ------------------------------------------------------------------ 6. routes and relays


def test_verbose_says_direct_or_relayed_and_listen_says_registered(
    cli: Cli, tmp_path: Path
) -> None:
    port = free_port()
    relay_args = ("relay", "--listen", f"tcp:127.0.0.1:{port}", "--state-dir", "relay")
    relay = cli.start(*relay_args)
    assert relay.stdout is not None
    relay_uri = relay.stdout.readline().decode().strip()
    listen = cli.start("listen", "--relay", relay_uri, "--listen", "127.0.0.1:0", "--uri-file", "u")
    read_stderr_until(listen, r"capsock: (registered with relay \S+): reachable")
    uri = Capability.parse(cli.wait_file(tmp_path / "u", listen))
    direct = uri.with_hints([h for h in uri.hints if not isinstance(h, ViaHint)])
    relayed = uri.with_hints([h for h in uri.hints if isinstance(h, ViaHint)])
    for cap, how in [(direct, "direct route, tcp=127.0.0.1:"), (relayed, "relayed route, via ")]:
        result = cli.run("-v", "connect", str(cap), input=b"")
        assert result.returncode == 0, result.stderr.decode()
        assert f"reached node {uri.node.short()}: {how}" in result.stderr.decode()
    quiet = cli.run("connect", str(direct), input=b"")
    assert b"route" not in quiet.stderr  # only with -v

    # The relay restarts on the same address: the listener says it is back.
    cli.stop(relay)
    read_stderr_until(listen, r"(lost the relay)")
    relay = cli.start(*relay_args)
    read_stderr_until(listen, r"capsock: (registered again with relay \S+): reachable again")
    result = cli.run("connect", str(relayed), input=b"")
    assert result.returncode == 0, result.stderr.decode()
    cli.stop(listen)
    cli.stop(relay)


# ------------------------------------------------------------------ 7. damaged and cut URIs


def damaged_node_id(cap: Capability) -> str:
    """``cap``'s text with one character of its node id changed so that the id
    is still canonical base32 but no Ed25519 key (so no node can have it)."""
    text = str(cap)
    node = str(cap.node)
    for i in range(len(node) - 1):
        for ch in "abcdefghijklmnopqrstuvwxyz234567":
            candidate = node[:i] + ch + node[i + 1 :]
            try:
                NodeId.parse(candidate).x25519()
            except capsock.PeerAuthenticationError:
                return text.replace(node, candidate)
            except capsock.InvalidCapability:
                continue
    raise AssertionError("no damaged id found")


def test_a_damaged_node_id_is_a_malformed_uri(cli: Cli, tmp_path: Path) -> None:
    bad = damaged_node_id(offline_capability())
    (tmp_path / "bad.uri").write_text(bad + "\n")
    for args in [("connect", bad), ("receive", "@bad.uri"), ("forward", bad), ("inspect", bad)]:
        result = cli.run(*args)
        assert result.returncode == Exit.USAGE, (args, result.stderr.decode())
        assert "damaged" in one_line_error(result.stderr), args
    # Also inside a via hint (the relay's id).
    relay = offline_capability()
    outer = offline_capability().with_hints([ViaHint(Capability.parse(damaged_node_id(relay)))])
    result = cli.run("connect", str(outer))
    assert result.returncode == Exit.USAGE, result.stderr.decode()


def test_a_uri_cut_short_gets_advice(cli: Cli) -> None:
    text = str(offline_capability())
    q = text.index("?")
    slash = text.index("/", len("capsock://"))
    for cut in [text[: q + 1], text[:q], text[: q + 5], text[: q - 4], text[: slash + 1]]:
        result = cli.run("connect", cut)
        assert result.returncode == Exit.USAGE, (cut[q - 10 :], result.stderr.decode())
        assert "looks cut short" in one_line_error(result.stderr), cut[q - 10 :]


# ------------------------------------------------------------------ 8. documentation


def test_api_docs_cover_messages_and_every_stats_key() -> None:
    api = (DOCS / "api.md").read_text()
    for name in ("send_message", "receive_message"):
        assert re.search(rf"`(await )?{name}\(", api), name
    keys: list[str] = []

    async def main() -> None:
        async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
            keys.extend(node.stats())

    anyio.run(main)
    assert "session_count" in keys
    section = api[api.index("`stats()`") :]
    for key in keys:
        assert f"`{key}`" in section, key


def test_cli_docs_list_the_to_caveat_of_inspect_json() -> None:
    text = (DOCS / "cli.md").read_text()
    section = text[text.index("### `capsock inspect`") : text.index("### `capsock revoke`")]
    for kind in ('"exp"', '"uses"', '"peer"', '"to"', '"label"'):
        assert kind in section, kind


def test_tutorial_shows_logging_where_it_says_the_server_logs_the_reason() -> None:
    text = (DOCS / "tutorial.md").read_text()
    at = text.index("logs the reason")
    nearby = text[max(0, at - 1500) : at + 1500]
    assert "logging.basicConfig(" in nearby
    run = subprocess.run(
        [sys.executable, "tutorial_pair.py"], cwd=ROOT / "examples", capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.search(r"capsock.node: refused a stream from \S+: used up", run.stderr), run.stderr


# ------------------------------------------------------------------ 10. messages


def test_relay_says_where_the_capability_went(cli: Cli, tmp_path: Path) -> None:
    with (tmp_path / "relay.uri").open("wb") as out:
        relay = cli.start(
            "relay", "--listen", f"tcp:127.0.0.1:{free_port()}", "--state-dir", "r", stdout=out
        )
        line = read_stderr_until(relay, r"(forwarding; [^\n]*)")
    assert "above" not in line and "written to stdout" in line
    cli.stop(relay)
    assert (tmp_path / "relay.uri").read_text().startswith("capsock://")


def test_a_lost_connection_is_said_in_words() -> None:
    from capsock.net.session import _lost_reason

    plain = _lost_reason(anyio.BrokenResourceError())
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except OSError as exc:
            raise anyio.BrokenResourceError from exc
    except anyio.BrokenResourceError as exc:
        reset = _lost_reason(exc)
    closed = _lost_reason(anyio.ClosedResourceError())
    for text in (plain, reset, closed):
        assert not re.search(r"[A-Z][a-z]+[A-Z][a-z]+", text), text  # no CamelCase class names
        assert text.startswith("connection lost: ")
    assert reset == "connection lost: connection reset by peer"


@pytest.mark.anyio
async def test_a_retired_one_shot_is_logged_as_used_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="capsock")
    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as server, capsock.Node() as client:
        listener = await server.mint(uses=1)
        stream = await client.connect(listener.uri)
        await (await listener.accept()).aclose()
        await stream.aclose()
        await listener.aclose()  # its temporary root is forgotten
        caplog.clear()
        with pytest.raises(capsock.CapabilityRejected) as refused:
            await client.connect(listener.uri)
        assert refused.value.code == capsock.ErrorCode.REFUSED  # the dialer: uniform
        lines = [r.getMessage() for r in caplog.records if "refused a stream" in r.getMessage()]
        assert len(lines) == 1 and lines[0].endswith(": used up"), lines

        expiring = await server.mint(ttl=1)
        with anyio.fail_after(10), pytest.raises(anyio.ClosedResourceError):
            await expiring.accept()  # retired once expired
        await expiring.aclose()
        caplog.clear()
        with pytest.raises(capsock.CapabilityRejected):
            await client.connect(expiring.uri)
        lines = [r.getMessage() for r in caplog.records if "refused a stream" in r.getMessage()]
        assert len(lines) == 1 and lines[0].endswith(": expired"), lines


# ------------------------------------------------------------------ 11. help, fish, exit codes


def test_help_points_to_a_reference_that_ships_with_the_package(cli: Cli) -> None:
    from capsock.cli.manual import reference_text

    top = cli.run("--help")
    assert top.returncode == 0
    text = " ".join(top.stdout.decode().split())
    assert "in the capsock source" not in text and "`capsock help`" in text
    assert reference_text() == (DOCS / "cli.md").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "cli/reference.md" in project["tool"]["setuptools"]["package-data"]["capsock"]
    codes = cli.run("help", "exit-codes")
    assert codes.returncode == 0 and codes.stdout.decode().startswith("## Exit codes")
    for name in ("send", "forward", "listen", "exit"):
        result = cli.run("help", name)
        assert result.returncode == 0, name
    assert "`capsock forward`" in cli.run("help", "forward").stdout.decode()
    listing = cli.run("help").stdout.decode()
    assert "exit-codes" in listing and "listen" in listing
    bad = cli.run("help", "nope")
    assert bad.returncode == Exit.USAGE and "capsock help" in one_line_error(bad.stderr)


def test_help_topics_ignore_headings_inside_code_blocks() -> None:
    from capsock.cli.manual import topics

    sections = topics("## A\ntext\n```bash\n# not a heading\n## nor this\n```\n## B\nmore\n")
    assert list(sections) == ["a", "b"]
    assert "nor this" in sections["a"]


def test_every_exit_code_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    section = text[text.index("## Exit codes") :]
    for code in Exit:
        assert re.search(rf"^\| {int(code)} \|", section, re.M), code
    assert "nothing was dialed" in section  # local refusals
    assert "expired before anyone" in section  # listen --ttl and send agree


def test_fish_completion(cli: Cli, tmp_path: Path) -> None:
    from capsock.cli.completion import fish_script

    script = cli.run("completion", "fish")
    assert script.returncode == 0 and script.stderr == b""
    text = script.stdout.decode()
    top, commands = build_parser()
    assert text == fish_script(top, commands)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    token = r"""'(?:[^'\\]|\\.)*'|[^\s']+"""  # fish: \' and \\ inside single quotes
    for line in lines:
        assert re.fullmatch(rf"complete -c capsock(?: (?:{token}))*", line), line
    for name, (sub, _) in commands.items():
        assert any(f"-a {name} -d" in ln for ln in lines), name
        for action in sub._actions:
            for opt in action.option_strings:
                flag = f"-s {opt[1:]}" if len(opt) == 2 else f"-l {opt[2:]}"
                assert any(
                    f"__fish_seen_subcommand_from {name}'" in ln and f" {flag} " in ln
                    for ln in lines
                ), (name, opt)
    assert any("from completion' -a 'bash zsh fish'" in ln for ln in lines)
    assert any("-l state-dir -r -f -a '(__fish_complete_directories)'" in ln for ln in lines)
    fish = subprocess.run(["sh", "-c", "command -v fish"], capture_output=True).stdout.strip()
    if fish:
        (tmp_path / "c.fish").write_text(text)
        probe = "source c.fish; complete -C 'capsock se'"
        out = subprocess.run([fish, "-c", probe], cwd=tmp_path, capture_output=True, timeout=30)
        assert b"send" in out.stdout


def test_listen_ttl_and_send_agree_when_the_capability_expires_unused(
    cli: Cli, tmp_path: Path
) -> None:
    (tmp_path / "f.txt").write_text("x")
    listen = cli.run("listen", "--ttl", "1")
    send = cli.run("send", "f.txt", "--ttl", "1")
    assert listen.returncode == send.returncode == Exit.ERROR, (listen.stderr, send.stderr)
    assert "nobody connected before the capability expired" in listen.stderr.decode()
    assert "nobody received it before the capability expired" in send.stderr.decode()


def test_listen_that_served_then_expired_is_a_success(cli: Cli, tmp_path: Path) -> None:
    listen = cli.start("listen", "--ttl", "3", "--uri-file", "uri")
    uri = cli.wait_file(tmp_path / "uri", listen)
    assert cli.run("connect", uri, input=b"hi").returncode == 0
    out, err = listen.communicate(timeout=30)
    assert listen.returncode == 0, err.decode()
    assert out == b"hi"
