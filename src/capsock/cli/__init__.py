"""The ``capsock`` command.  stdout carries only data; messages go to stderr.

One module per group of commands: :mod:`.pipes` (listen, connect, share,
forward), :mod:`.transfer` (send, receive), :mod:`.caps` (id, attenuate,
inspect, revoke), :mod:`.demo` (demo, relay), :mod:`.completion`; :mod:`.app`
holds the parser and turns failures into exit codes; :mod:`.common` what they
share.  The reference is docs/cli.md.
"""

from __future__ import annotations

from .app import build_parser, main
from .common import Exit, state_home

__all__ = ["Exit", "build_parser", "main", "state_home"]
