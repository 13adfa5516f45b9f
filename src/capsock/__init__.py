"""capsock: capability-based, end-to-end encrypted byte streams.

A stream endpoint is named by a capability URI (``capsock://<node-id>/<token>``):
holding the URI is the permission to open an encrypted stream to it, and the
node id in it makes sure you reach the right node.

    async with capsock.Node(listen=["tcp:127.0.0.1:0"]) as node:
        listener = await node.listen()
        print(listener.uri)                  # hand this string to a peer
        stream = await listener.accept()     # an anyio.abc.ByteStream
"""

from __future__ import annotations

from .config import MuxConfig, NodeConfig, SessionConfig
from .errors import (
    CapabilityRejected,
    CapsockError,
    ConnectionLost,
    ErrorCode,
    HandshakeError,
    InvalidCapability,
    LocalUsageError,
    PeerAuthenticationError,
    ProtocolError,
    ResourceLimitExceeded,
    StreamReset,
    Unreachable,
)
from .keys import KeyPair, NodeId
from .messages import receive_capability, receive_message, send_capability, send_message
from .net.stream import CapsockAttribute, Stream
from .node import Listener, Node
from .services import forward, share, splice
from .transfer import (
    NotAnOffer,
    TransferDeclined,
    TransferError,
    TransferIntegrityError,
    UnsafeTarget,
    receive_path,
    send_path,
)
from .uri import Capability, parse

__version__ = "0.1.0"

__all__ = [
    "Capability",
    "CapabilityRejected",
    "CapsockAttribute",
    "CapsockError",
    "ConnectionLost",
    "ErrorCode",
    "HandshakeError",
    "InvalidCapability",
    "KeyPair",
    "Listener",
    "LocalUsageError",
    "MuxConfig",
    "Node",
    "NodeConfig",
    "NodeId",
    "NotAnOffer",
    "PeerAuthenticationError",
    "ProtocolError",
    "ResourceLimitExceeded",
    "SessionConfig",
    "Stream",
    "StreamReset",
    "TransferDeclined",
    "TransferError",
    "TransferIntegrityError",
    "Unreachable",
    "UnsafeTarget",
    "__version__",
    "forward",
    "parse",
    "receive_capability",
    "receive_message",
    "receive_path",
    "send_capability",
    "send_message",
    "send_path",
    "share",
    "splice",
]
