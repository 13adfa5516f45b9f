"""``--no-direct``: the opt-out of direct paths on every command that dials or listens."""

from __future__ import annotations

import pytest

from capsock import Capability, KeyPair
from capsock.cli.app import build_parser
from capsock.cli.common import dialing_node
from capsock.uri import TcpHint, mint_root

DIALING = ["connect", "receive", "forward"]
LISTENING = ["listen", "send", "share"]


@pytest.mark.parametrize("command", DIALING + LISTENING)
def test_every_dialing_and_listening_command_has_no_direct(command: str) -> None:
    parser, _ = build_parser()
    usage = parser._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]
    assert "--no-direct" in usage


@pytest.mark.anyio
async def test_no_direct_turns_the_node_config_off() -> None:
    parser, _ = build_parser()
    token = mint_root(b"k" * 32, b"r" * 16)
    target = Capability(KeyPair.generate().node_id, token, (TcpHint("127.0.0.1", 9),))
    for extra, expected in (([], True), (["--no-direct"], False)):
        args = parser.parse_args(["connect", "--ephemeral", *extra, str(target)])
        assert dialing_node(args, target).config.direct_paths is expected
