"""Node internals, part 6: relay upkeep.

A node given relays keeps one registration stream open with each (reconnect
with backoff and jitter; a refused capability is given up for good) and
reports each relay's status.  It depends only on :class:`RelayHost`, a small
protocol that :class:`capsock.Node` satisfies; registering is
:func:`capsock.node.forwarding.register`.
"""

from __future__ import annotations

import logging
import secrets
from typing import Protocol

import anyio
import anyio.abc

from ..config import NodeConfig
from ..core.direct import Address
from ..errors import (
    CapabilityRejected,
    CapsockError,
    ErrorCode,
)
from ..keys import NodeId
from ..net.stream import Stream
from ..uri import (
    Capability,
)
from ._dialing import SHARED_PORT_DIAL
from .forwarding import register_info

log = logging.getLogger("capsock.node")


class RelayHost(Protocol):
    """What relay upkeep needs of a node."""

    @property
    def id(self) -> NodeId: ...
    @property
    def config(self) -> NodeConfig: ...
    async def connect(self, uri: str | Capability) -> Stream: ...

    relay_status: dict[str, str]
    _observed: dict[NodeId, Address]
    _relay_changed: anyio.Event
    _relay_refusals: dict[str, CapabilityRejected]
    _closed: bool


class RelayUpkeep:
    """Stay registered with each relay (see the module docstring)."""

    async def _keep_relay(self: RelayHost, relay: Capability) -> None:
        """Stay registered with ``relay``: reconnect with backoff and jitter."""
        first, largest = self.config.relay_backoff
        delay = first
        key = relay.redacted()
        while not self._closed:
            RelayUpkeep._set_relay_status(self, key, "connecting")
            token = SHARED_PORT_DIAL.set(True)  # the relay observes the shared port
            try:
                stream, info = await register_info(self, relay)
            except (CapsockError, OSError, TimeoutError, anyio.BrokenResourceError) as exc:
                SHARED_PORT_DIAL.reset(token)
                if isinstance(exc, CapabilityRejected) and exc.code == ErrorCode.REFUSED:
                    # The capability is dead (revoked, expired, forged): retrying
                    # cannot help.  BUSY and SHUTTING_DOWN are worth a retry.
                    self._relay_refusals[key] = exc
                    RelayUpkeep._set_relay_status(self, key, f"refused: {exc}")
                    log.warning("relay %s: %s; not retrying", relay.node.short(), str(exc))
                    return
                RelayUpkeep._set_relay_status(self, key, f"failed: {exc}")
                log.warning("relay %s: %s; retrying in %.1f s", relay.node.short(), str(exc), delay)
            else:
                SHARED_PORT_DIAL.reset(token)
                if info.observed is not None:
                    # A punch candidate only (docs/direct-paths.md, section 2).
                    self._observed[relay.node] = info.observed
                RelayUpkeep._set_relay_status(self, key, "registered")
                delay = first
                log.info("registered with relay %s", relay.node.short())
                try:
                    async with stream:
                        while True:
                            await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, CapsockError):
                    self._observed.pop(relay.node, None)
                    RelayUpkeep._set_relay_status(self, key, "lost")
                    if self._closed:  # our own shutdown closed the session
                        return
                    log.warning("lost the relay %s; reconnecting", relay.node.short())
            await anyio.sleep(delay * (0.5 + secrets.randbelow(1000) / 1000))
            delay = min(delay * 2, largest)

    def _set_relay_status(self: RelayHost, key: str, status: str) -> None:
        self.relay_status[key] = status
        self._relay_changed.set()
        self._relay_changed = anyio.Event()
