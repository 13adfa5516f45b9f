"""A minimal, blocking capsock/1 client written from ``docs/protocol.md`` alone.

It exists to show that the wire spec is enough for an independent
implementation: it does not import ``capsock``. It uses the standard library
and PyNaCl's libsodium bindings (X25519, Ed25519 to Curve25519 conversion,
ChaCha20-Poly1305 IETF); BLAKE2b and HMAC come from ``hashlib``/``hmac``.

What it does (section numbers refer to ``docs/protocol.md``):

1. parse a capability URI (4.1) and decode its token (4.2, only the outer
   framing is needed: the token is sent as opaque bytes);
2. TCP-connect to the first ``tcp=`` hint (4.1; ``unix`` and ``via`` hints
   are not supported);
3. run ``Noise_IK_25519_ChaChaPoly_BLAKE2b`` as the initiator with the
   prologue ``capsock/1``; by default with no extensions, i.e. the plain-Noise
   path, or with a cipher offer (3.1-3.5);
4. speak first with ``OPEN(1, token)`` (3.5, 5, 6.2), wait for ACCEPT/REJECT;
5. send the payload as DATA within the peer's credit (6.4), then EOF (6.5);
6. read until the peer's EOF, returning credit as data is consumed (6.4),
   then close the session with ``GOAWAY(0, NO_ERROR)`` (7).

Beyond that one exchange it has the pieces the golden vectors
(``docs/vectors/``) and the byte-level tests of the spec's decisions need, all
written from the spec: a fixed ephemeral key, the AES-256-GCM cipher offer
(3.4, 3.5), raw frame I/O (5), the token tag chain (4.3), a small msgpack
codec (10.3: the formats the spec names) and forwarding requests (10.3).

CLI: ``python tests/spec_client.py URI`` sends stdin and writes the answer to
stdout.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from nacl import bindings as nb

__all__ = [
    "CapabilityRefused",
    "ForwardingOutcome",
    "HandshakeFailed",
    "ParsedCapability",
    "SpecClientError",
    "StreamAborted",
    "caveat_tag",
    "decode_frames",
    "echo_once",
    "encode_frame",
    "forwarding_message",
    "forwarding_request",
    "msgpack_pack",
    "msgpack_unpack",
    "parse_capability",
    "root_tag",
]

# --- errors -------------------------------------------------------------------


class SpecClientError(Exception):
    """Base class of this client's errors."""


class HandshakeFailed(SpecClientError):
    """The Noise handshake failed (3.4): typically the node does not hold the key."""


class CapabilityRefused(SpecClientError):
    """The endpoint answered our OPEN with ``REJECT(id, code)`` (4.4, 8)."""

    def __init__(self, code: int) -> None:
        name = ERROR_NAMES.get(code, "INTERNAL_ERROR")
        super().__init__(f"capability refused by the endpoint: REJECT code {code} ({name})")
        self.code = code


class StreamAborted(SpecClientError):
    """The stream or session ended without a clean EOF (RESET, GOAWAY, lost transport)."""


# --- constants ------------------------------------------------------------------

# 8. Error codes.
ERROR_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "REFUSED",
    5: "CANCELLED",
    6: "BUSY",
    7: "LIMIT_EXCEEDED",
    8: "SHUTTING_DOWN",
    9: "TIMEOUT",
}

# 5. Frame types.
OPEN, ACCEPT, REJECT, DATA, WINDOW, EOF, RESET, PING, PONG, GOAWAY, CONTROL = range(1, 12)
FRAME_HEADER = struct.Struct(">BIH")  # type u8, stream_id u32, length u16: 7 bytes

# 3.1 / 3.5 Noise parameters.
PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2b"
PROLOGUE = b"capsock/1"
HASHLEN = 64  # BLAKE2b-512
TAGLEN = 16
MAX_MESSAGE = 65535  # 2: a record carries at most 65535 bytes
MAX_DATA = MAX_MESSAGE - TAGLEN - FRAME_HEADER.size  # 5: 65512

# 6.4 Credit windows (protocol constants).
INITIAL_STREAM_WINDOW = 262144
INITIAL_SESSION_WINDOW = 1048576

STREAM_ID = 1  # 6.1: the dialer opens odd ids; this client opens exactly one stream.


# --- 4.1 capability URIs ----------------------------------------------------------

_URI_RE = re.compile(
    r"capsock://(?P<node>[a-z2-7]{52})/(?P<token>[A-Za-z0-9_-]+)(?:\?(?P<query>.+))?\Z"
)


@dataclass(frozen=True)
class ParsedCapability:
    """The parts of a capability URI this client needs (4.1)."""

    node_id: bytes  # 32-byte Ed25519 public key (3.2)
    token: bytes  # binary token (4.2), sent verbatim in OPEN
    tcp: list[tuple[str, int]] = field(default_factory=list)


def _b32decode_node_id(text: str) -> bytes:
    """Decode a 52-character lower-case, unpadded base32 node id (3.2)."""
    raw = base64.b32decode(text.upper() + "====")
    if len(raw) != 32 or base64.b32encode(raw).decode().rstrip("=").lower() != text:
        raise ValueError("node id is not canonical base32 (trailing bits must be zero)")
    return raw


def _b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url and insist on the canonical form (4.1)."""
    if len(text) % 4 == 1:
        raise ValueError("token length is 1 mod 4")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != text:
        raise ValueError("token is not canonical base64url")
    return raw


def parse_capability(uri: str) -> ParsedCapability:
    """Parse ``capsock://<node-id>/<token>[?hints]`` (4.1).

    Only as strict as this client needs: the grammar, canonical base32/base64url,
    the token's outer framing (4.2) and ``tcp=HOST:PORT`` hints. ``unix``,
    ``via`` and ``v`` (compact via) hints are accepted and ignored.
    """
    if len(uri) > 4096 or not uri.isascii() or not uri.isprintable() or " " in uri:
        raise ValueError("a capability URI is at most 4096 printable ASCII characters")
    m = _URI_RE.match(uri)
    if m is None:
        raise ValueError("not a capsock:// capability URI")
    node_id = _b32decode_node_id(m["node"])
    token = _b64url_decode(m["token"])
    # 4.2: 0x01 | root_id (16) | n | n x (kind, len, value) | tag (32)
    if len(token) < 1 + 16 + 1 + 32 or token[0] != 0x01:
        raise ValueError("token is not a version-1 capsock token")
    pos, n = 18, token[17]
    for _ in range(n):
        if pos + 2 > len(token):
            raise ValueError("token truncated inside a caveat")
        pos += 2 + token[pos + 1]
    if n > 32 or pos + 32 != len(token):
        raise ValueError("token has a wrong length")
    tcp: list[tuple[str, int]] = []
    if m["query"] is not None:
        for hint in m["query"].split("&"):
            key, sep, value = hint.partition("=")
            if not sep or not value or key not in ("tcp", "unix", "via", "v"):
                raise ValueError(f"bad hint {key!r}")
            if key == "tcp":
                host, _, port = value.rpartition(":")
                if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                    raise ValueError("bad tcp hint")
                tcp.append((host.strip("[]"), int(port)))
    return ParsedCapability(node_id, token, tcp)


# --- 3. Noise_IK_25519_ChaChaPoly_BLAKE2b, initiator side ----------------------------


def _nonce(n: int) -> bytes:
    """3.5: ChaChaPoly nonce = 4 zero bytes | n as u64 little-endian."""
    return b"\x00" * 4 + n.to_bytes(8, "little")


def _nonce_aesgcm(n: int) -> bytes:
    """3.5: AESGCM nonce = 4 zero bytes | n as u64 big-endian."""
    return b"\x00" * 4 + n.to_bytes(8, "big")


CHACHAPOLY_ID, AESGCM_ID = 0x01, 0x02  # 3.4 cipher ids


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2b).digest()


def _hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise HKDF with two outputs (Noise spec section 4.3)."""
    temp = _hmac(ck, ikm)
    out1 = _hmac(temp, b"\x01")
    return out1, _hmac(temp, out1 + b"\x02")


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        shared: bytes = nb.crypto_scalarmult(private, public)
    except Exception as exc:  # libsodium refuses an all-zero (low-order) result
        raise HandshakeFailed("invalid or low-order public key in the handshake") from exc
    return shared


class CipherState:
    """A Noise CipherState with ChaChaPoly or AESGCM (Noise spec 5.1, capsock 3.5)."""

    def __init__(self, key: bytes | None = None, cipher_id: int = CHACHAPOLY_ID) -> None:
        self.key = key
        self.n = 0
        if cipher_id == AESGCM_ID:
            self._nonce = _nonce_aesgcm
            self._seal = nb.crypto_aead_aes256gcm_encrypt
            self._open = nb.crypto_aead_aes256gcm_decrypt
        else:
            self._nonce = _nonce
            self._seal = nb.crypto_aead_chacha20poly1305_ietf_encrypt
            self._open = nb.crypto_aead_chacha20poly1305_ietf_decrypt

    def encrypt(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.key is None:
            return plaintext
        if self.n >= 2**64 - 1:  # 3.5: nonce 2^64-1 is reserved
            raise SpecClientError("nonce space exhausted")
        ct: bytes = self._seal(plaintext, ad, self._nonce(self.n), self.key)
        self.n += 1
        return ct

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.key is None:
            return ciphertext
        pt: bytes = self._open(ciphertext, ad, self._nonce(self.n), self.key)
        self.n += 1
        return pt


class IKInitiator:
    """The dialer's half of ``Noise_IK`` (3.1): ``-> e, es, s, ss`` / ``<- e, ee, se``."""

    def __init__(
        self, static_private: bytes, remote_static: bytes, ephemeral: bytes | None = None
    ) -> None:
        self.s_priv = static_private
        self.s_pub: bytes = nb.crypto_scalarmult_base(static_private)
        self.rs = remote_static
        self.e_priv = os.urandom(32) if ephemeral is None else ephemeral
        self.e_pub: bytes = nb.crypto_scalarmult_base(self.e_priv)
        # InitializeSymmetric: the name fits in HASHLEN, so h = name padded with zeros.
        self.h = PROTOCOL_NAME.ljust(HASHLEN, b"\x00")
        self.ck = self.h
        self.cipher = CipherState()
        self._mix_hash(PROLOGUE)
        self._mix_hash(self.rs)  # pre-message "<- s"

    def _mix_hash(self, data: bytes) -> None:
        self.h = hashlib.blake2b(self.h + data).digest()

    def _mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf(self.ck, ikm)
        self.cipher = CipherState(temp_k[:32])

    def _encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cipher.encrypt(self.h, plaintext)
        self._mix_hash(ct)
        return ct

    def _decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cipher.decrypt(self.h, ciphertext)
        self._mix_hash(ciphertext)
        return pt

    def write_message_1(self, payload: bytes) -> bytes:
        """``-> e, es, s, ss`` + payload (3.3)."""
        self._mix_hash(self.e_pub)
        self._mix_key(_dh(self.e_priv, self.rs))
        enc_s = self._encrypt_and_hash(self.s_pub)
        self._mix_key(_dh(self.s_priv, self.rs))
        return self.e_pub + enc_s + self._encrypt_and_hash(payload)

    def read_message_2(self, message: bytes) -> bytes:
        """``<- e, ee, se`` + payload (3.4); returns the decrypted payload."""
        if len(message) < 32 + TAGLEN:
            raise HandshakeFailed("message 2 is too short")
        re_pub = message[:32]
        self._mix_hash(re_pub)
        self._mix_key(_dh(self.e_priv, re_pub))
        self._mix_key(_dh(self.s_priv, re_pub))
        try:
            return self._decrypt_and_hash(message[32:])
        except Exception as exc:
            raise HandshakeFailed("message 2 did not decrypt: wrong node key") from exc

    def split(self, cipher_id: int = CHACHAPOLY_ID) -> tuple[CipherState, CipherState]:
        """3.5: first key dialer-to-responder, second responder-to-dialer."""
        k1, k2 = _hkdf(self.ck, b"")
        return CipherState(k1[:32], cipher_id), CipherState(k2[:32], cipher_id)


def parse_extensions(payload: bytes) -> dict[int, bytes]:
    """3.4: ``type u8 | length u8 | value`` until the end exactly; the known
    type (1) at most once; unknown types are skipped."""
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload):
        if pos + 2 > len(payload) or pos + 2 + payload[pos + 1] > len(payload):
            raise HandshakeFailed("malformed extensions")
        kind, value = payload[pos], payload[pos + 2 : pos + 2 + payload[pos + 1]]
        pos += 2 + len(value)
        if kind == 1:
            if kind in found:
                raise HandshakeFailed("extension 1 appears twice")
            found[kind] = value
    return found


def read_choice(payload: bytes, offer: bytes) -> int:
    """3.4, the dialer's checks of message 2: the cipher id to use."""
    choice = parse_extensions(payload).get(1)
    if choice is None:
        return CHACHAPOLY_ID  # no choice means ChaChaPoly
    if not offer:
        raise HandshakeFailed("cipher choice in message 2 although we made no offer")
    if len(choice) != 1 or choice[0] not in offer:
        raise HandshakeFailed("the responder chose a cipher we did not offer")
    return choice[0]


# --- 4.3 the tag chain ------------------------------------------------------------


def _blake2b_256(key: bytes, person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, key=key, person=person).digest()


def root_tag(root_key: bytes, root_id: bytes) -> bytes:
    """4.3: ``tag_0``; ``hashlib`` pads the personalisation with zero bytes."""
    return _blake2b_256(root_key, b"capsock/1 root", root_id)


def caveat_tag(tag: bytes, caveat: bytes) -> bytes:
    """4.3: the next tag over one encoded caveat (``kind | len | value``)."""
    return _blake2b_256(tag, b"capsock/1 caveat", caveat)


# --- 10.3 msgpack, only the formats the spec uses -----------------------------------


def msgpack_pack(obj: object) -> bytes:
    """The smallest msgpack encoding of nil, bool, int, str (UTF-8, ``str``
    formats), bytes (``bin`` formats), list and map (10.3)."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj <= 0x7F:
            return bytes((obj,))
        if -32 <= obj < 0:
            return struct.pack(">b", obj)
        if obj > 0:
            for tag, fmt, top in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32)):
                if obj < top:
                    return bytes((tag,)) + struct.pack(fmt, obj)
            return b"\xcf" + struct.pack(">Q", obj)
        for tag, fmt, low in (
            (0xD0, ">b", -(2**7)),
            (0xD1, ">h", -(2**15)),
            (0xD2, ">i", -(2**31)),
        ):
            if obj >= low:
                return bytes((tag,)) + struct.pack(fmt, obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        n = len(raw)
        if n < 32:
            head = bytes((0xA0 | n,))
        elif n < 2**8:
            head = b"\xd9" + struct.pack(">B", n)
        elif n < 2**16:
            head = b"\xda" + struct.pack(">H", n)
        else:
            head = b"\xdb" + struct.pack(">I", n)
        return head + raw
    if isinstance(obj, bytes):
        n = len(obj)
        if n < 2**8:
            return b"\xc4" + struct.pack(">B", n) + obj
        if n < 2**16:
            return b"\xc5" + struct.pack(">H", n) + obj
        return b"\xc6" + struct.pack(">I", n) + obj
    if isinstance(obj, list):
        n = len(obj)
        head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + struct.pack(">H", n)
        return head + b"".join(msgpack_pack(x) for x in obj)
    if isinstance(obj, dict):
        n = len(obj)
        head = bytes((0x80 | n,)) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(msgpack_pack(k) + msgpack_pack(v) for k, v in obj.items())
    raise TypeError(f"cannot pack {type(obj).__name__}")


def msgpack_unpack(data: bytes) -> object:
    """Decode exactly one msgpack value filling ``data`` (any valid length
    format is accepted); map keys must be str. Raises ``ValueError``."""
    value, end = _unpack(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after the msgpack value")
    return value


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise ValueError("truncated msgpack value")
    return data[pos : pos + n], pos + n


def _unpack(data: bytes, pos: int) -> tuple[object, int]:
    raw, pos = _take(data, pos, 1)
    b = raw[0]
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6):
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
        else:
            width = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4}[b]
            size, pos = _take(data, pos, width)
            n = int.from_bytes(size, "big")
        body, pos = _take(data, pos, n)
        return (bytes(body) if b in (0xC4, 0xC5, 0xC6) else body.decode("utf-8")), pos
    if 0x80 <= b <= 0x8F or 0x90 <= b <= 0x9F or b in (0xDC, 0xDD, 0xDE, 0xDF):
        if b <= 0x9F:
            n = b & 0x0F
        else:
            size, pos = _take(data, pos, 2 if b in (0xDC, 0xDE) else 4)
            n = int.from_bytes(size, "big")
        if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
            items = []
            for _ in range(n):
                item, pos = _unpack(data, pos)
                items.append(item)
            return items, pos
        out: dict[str, object] = {}
        for _ in range(n):
            key, pos = _unpack(data, pos)
            if not isinstance(key, str):
                raise ValueError("map key is not a str")
            out[key], pos = _unpack(data, pos)
        return out, pos
    fixed = {0xC0: None, 0xC2: False, 0xC3: True}
    if b in fixed:
        return fixed[b], pos
    ints = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
            0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}  # fmt: skip
    if b in ints:
        width, signed = ints[b]
        body, pos = _take(data, pos, width)
        return int.from_bytes(body, "big", signed=signed), pos
    raise ValueError(f"msgpack format 0x{b:02x} is not used by capsock/1")


def forwarding_message(obj: object) -> bytes:
    """10.3: ``length u32 | msgpack body``."""
    body = msgpack_pack(obj)
    return struct.pack(">I", len(body)) + body


# --- 5. frames ----------------------------------------------------------------------


def encode_frame(ftype: int, sid: int, payload: bytes = b"") -> bytes:
    """5: ``type u8 | stream_id u32 | length u16 | payload``."""
    return FRAME_HEADER.pack(ftype, sid, len(payload)) + payload


def decode_frames(body: bytes) -> list[tuple[int, int, bytes]]:
    """5: every frame of one decrypted message, decoded before any is acted on."""
    frames: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(body):
        if pos + FRAME_HEADER.size > len(body):
            raise StreamAborted("protocol error: truncated frame header")
        ftype, sid, length = FRAME_HEADER.unpack_from(body, pos)
        pos += FRAME_HEADER.size
        if pos + length > len(body):
            raise StreamAborted("protocol error: frame runs past the message")
        frames.append((ftype, sid, body[pos : pos + length]))
        pos += length
    if not frames:
        raise StreamAborted("protocol error: empty transport message")
    return frames


# --- 2. transport records and a session ---------------------------------------------


class Session:
    """One blocking capsock/1 session over a TCP socket, dialer side, one stream."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.rbuf = bytearray()
        self.tx: CipherState | None = None
        self.rx: CipherState | None = None
        # 6.4: our send credit and the receive credit we still owe the peer.
        self.send_stream = INITIAL_STREAM_WINDOW
        self.send_session = INITIAL_SESSION_WINDOW
        self.recv_stream_left = INITIAL_STREAM_WINDOW
        self.recv_session_left = INITIAL_SESSION_WINDOW
        self.unacked_stream = 0
        self.unacked_session = 0
        # set by handshake()
        self.node_id = b""  # our own Ed25519 public key
        self.cipher_id = CHACHAPOLY_ID
        self.handshake_hash = b""
        self.message1 = self.message2 = b""
        # stream 1 state
        self.accepted = False
        self.peer_eof = False
        self.received = bytearray()

    # -- records (2) --

    def _recv_exact(self, n: int) -> bytes:
        while len(self.rbuf) < n:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("capsock spec client timed out")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(max(65536, n - len(self.rbuf)))
            if not chunk:
                raise EOFError("transport closed by the peer")
            self.rbuf += chunk
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def read_record(self) -> bytes:
        (length,) = struct.unpack(">H", self._recv_exact(2))
        if length == 0:
            raise StreamAborted("protocol error: zero-length record")
        return self._recv_exact(length)

    def write_record(self, message: bytes) -> None:
        assert 1 <= len(message) <= MAX_MESSAGE
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        self.sock.sendall(struct.pack(">H", len(message)) + message)

    # -- handshake (3) --

    def handshake(
        self,
        remote_node_id: bytes,
        *,
        offer: bytes = b"",
        seed: bytes | None = None,
        ephemeral: bytes | None = None,
        extensions: bytes = b"",
    ) -> None:
        """Run IK as the dialer (3.3-3.5). ``offer``: cipher ids, most preferred
        first (empty: no offer, plain Noise); ``seed``: our Ed25519 seed (default a
        fresh one); ``ephemeral``: a fixed X25519 ephemeral key (vectors only);
        ``extensions``: raw extension bytes to add after the offer (3.4)."""
        try:
            rs: bytes = nb.crypto_sign_ed25519_pk_to_curve25519(remote_node_id)
        except Exception as exc:  # 3.2: not a valid Ed25519 point
            raise HandshakeFailed("node id is not a valid Ed25519 public key") from exc
        # 3.2 conversions; by default a fresh, throwaway identity for the dialer.
        pk, sk = nb.crypto_sign_seed_keypair(os.urandom(32) if seed is None else seed)
        self.node_id = pk
        noise = IKInitiator(nb.crypto_sign_ed25519_sk_to_curve25519(sk), rs, ephemeral)
        # 3.3: payload = our Ed25519 node id, then the offer extension if any.
        payload = pk + (bytes((1, len(offer))) + offer if offer else b"") + extensions
        self.message1 = noise.write_message_1(payload)
        self.write_record(self.message1)
        try:
            self.message2 = self.read_record()
        except (EOFError, ConnectionResetError) as exc:  # 3.4: another key: it hangs up
            raise HandshakeFailed(
                "the node closed the connection during the handshake "
                "(it does not hold the key named in the URI)"
            ) from exc
        self.cipher_id = read_choice(noise.read_message_2(self.message2), offer)
        self.handshake_hash = noise.h
        self.tx, self.rx = noise.split(self.cipher_id)

    # -- frames (5) --

    def send_frames(self, *frames: tuple[int, int, bytes]) -> None:
        """One transport message carrying ``frames`` (type, stream id, payload)."""
        assert self.tx is not None
        body = b"".join(encode_frame(t, sid, p) for t, sid, p in frames)
        self.write_record(self.tx.encrypt(b"", body))

    def read_frames(self) -> list[tuple[int, int, bytes]]:
        """Read one transport message and return its frames, acting on none (5)."""
        assert self.rx is not None
        try:
            record = self.read_record()
        except EOFError as exc:
            raise StreamAborted("transport lost before the stream ended cleanly") from exc
        try:
            body = self.rx.decrypt(b"", record)
        except Exception as exc:
            raise StreamAborted("transport message failed authentication") from exc
        return decode_frames(body)

    def receive_message(self) -> None:
        """Read one transport message and act on all its frames (5, 6.3)."""
        for frame in self.read_frames():
            self._handle(*frame)

    def _handle(self, ftype: int, sid: int, payload: bytes) -> None:
        if ftype == WINDOW:
            (inc,) = struct.unpack(">I", payload)
            if sid == 0:
                self.send_session += inc
            elif sid == STREAM_ID:
                self.send_stream += inc
        elif ftype == PING:
            self.send_frames((PONG, 0, payload))
        elif ftype in (PONG, CONTROL):
            pass  # 5: CONTROL is reserved and ignored
        elif ftype == GOAWAY:
            last, code = struct.unpack(">IH", payload)
            if last < STREAM_ID or code != 0:
                raise StreamAborted(f"GOAWAY (last stream {last}, code {ERROR_NAMES.get(code)})")
        elif sid != STREAM_ID:
            # The peer may open even streams (6.1); refuse them without ceremony.
            if ftype == OPEN:
                self.send_frames((REJECT, sid, struct.pack(">H", 4)))
        elif ftype == ACCEPT:
            self.accepted = True
        elif ftype == REJECT:
            raise CapabilityRefused(struct.unpack(">H", payload)[0])
        elif ftype == RESET:
            code = struct.unpack(">H", payload)[0]
            raise StreamAborted(f"stream reset by the peer: {ERROR_NAMES.get(code, code)}")
        elif ftype == EOF:
            self.peer_eof = True
        elif ftype == DATA:
            self._on_data(payload)

    def _on_data(self, data: bytes) -> None:
        """6.4: check the credit, "consume" at once, return credit at half-window."""
        n = len(data)
        if n > self.recv_stream_left or n > self.recv_session_left or self.peer_eof:
            raise StreamAborted("peer sent DATA beyond its credit or after EOF")
        self.recv_stream_left -= n
        self.recv_session_left -= n
        self.received += data
        self.unacked_stream += n
        self.unacked_session += n
        grants: list[tuple[int, int, bytes]] = []
        if self.unacked_stream >= INITIAL_STREAM_WINDOW // 2:
            grants.append((WINDOW, STREAM_ID, struct.pack(">I", self.unacked_stream)))
            self.recv_stream_left += self.unacked_stream
            self.unacked_stream = 0
        if self.unacked_session >= INITIAL_SESSION_WINDOW // 2:
            grants.append((WINDOW, 0, struct.pack(">I", self.unacked_session)))
            self.recv_session_left += self.unacked_session
            self.unacked_session = 0
        if grants:
            self.send_frames(*grants)

    def _poll(self) -> None:
        """Handle whatever the peer already sent, without blocking."""
        while self.rbuf or select.select([self.sock], [], [], 0)[0]:
            self.receive_message()

    # -- the one stream (6.2, 6.4, 6.5) --

    def run(self, token: bytes, payload: bytes) -> bytes:
        # 3.5: the dialer speaks first; 6.2: OPEN(1, token).
        self.send_frames((OPEN, STREAM_ID, token))
        while not self.accepted:
            self.receive_message()
        view = memoryview(payload)
        while view:
            self._poll()
            credit = min(self.send_stream, self.send_session, MAX_DATA)
            if credit <= 0:
                self.receive_message()  # block until a WINDOW (or data) arrives
                continue
            chunk, view = view[:credit], view[credit:]
            self.send_stream -= len(chunk)
            self.send_session -= len(chunk)
            self.send_frames((DATA, STREAM_ID, bytes(chunk)))
        self.send_frames((EOF, STREAM_ID, b""))
        while not self.peer_eof:
            self.receive_message()
        # Both directions saw EOF: the stream is forgotten (6.3). End the session (7).
        self.send_frames((GOAWAY, 0, struct.pack(">IH", 0, 0)))
        return bytes(self.received)


@dataclass(frozen=True)
class ForwardingOutcome:
    """What a forwarder answered to one request (10.3)."""

    answer: object  # the decoded answer, or None if none arrived
    reset_code: int | None  # the RESET after a failure answer (None: not reset)
    eof: bool  # whether the forwarder ended the stream with EOF (it must not)
    trailing: bytes  # bytes after the answer before the stream ended (must be none)


def forwarding_request(uri: str, request: object, timeout: float = 10) -> ForwardingOutcome:
    """Open a stream with the forwarding capability ``uri`` and send ``request``.

    ``request`` is a value to send as one message (10.3), raw ``bytes`` to send
    as they are, ``None`` to send nothing, or a callable that makes the value
    from our node id. On ``{"ok": true}`` this returns at once (the stream
    would carry the nested session next); otherwise it reads until the stream
    ends. Raises ``CapabilityRefused`` if the OPEN is refused.
    """
    cap = parse_capability(uri)
    deadline = time.monotonic() + timeout
    with socket.create_connection(cap.tcp[0], timeout=timeout) as sock:
        session = Session(sock, deadline)
        session.handshake(cap.node_id)
        session.send_frames((OPEN, STREAM_ID, cap.token))
        while not session.accepted:
            session.receive_message()
        if callable(request):
            request = request(session.node_id)
        if isinstance(request, bytes):
            session.send_frames((DATA, STREAM_ID, request))
        elif request is not None:
            session.send_frames((DATA, STREAM_ID, forwarding_message(request)))
        data = bytearray()
        answer: object = None
        reset: int | None = None
        eof = False
        while reset is None and not eof:
            for ftype, sid, payload in session.read_frames():
                if ftype == PING:
                    session.send_frames((PONG, 0, payload))
                elif sid == STREAM_ID and ftype == DATA:
                    data += payload
                elif sid == STREAM_ID and ftype == EOF:
                    eof = True
                elif sid == STREAM_ID and ftype == RESET:
                    reset = struct.unpack(">H", payload)[0]
            if answer is None and len(data) >= 4:
                (length,) = struct.unpack(">I", data[:4])
                if len(data) >= 4 + length:
                    answer = msgpack_unpack(bytes(data[4 : 4 + length]))
                    del data[: 4 + length]
                    if isinstance(answer, dict) and answer.get("ok") is True:
                        break
        return ForwardingOutcome(answer, reset, eof, bytes(data))


def echo_once(uri: str, payload: bytes, timeout: float = 10) -> bytes:
    """Open one stream with ``uri``, send ``payload``, half-close, return the answer.

    Raises ``HandshakeFailed`` if the node does not prove the URI's key,
    ``CapabilityRefused`` (with ``.code``) on REJECT, ``StreamAborted`` if the
    stream ends without a clean EOF, and ``TimeoutError`` after ``timeout`` seconds.
    """
    cap = parse_capability(uri)
    if not cap.tcp:
        raise SpecClientError("this client needs a tcp= hint")
    deadline = time.monotonic() + timeout
    host, port = cap.tcp[0]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(sock, deadline)
        session.handshake(cap.node_id)
        return session.run(cap.token, payload)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python tests/spec_client.py CAPSOCK_URI < input > output", file=sys.stderr)
        return 2
    try:
        answer = echo_once(args[0], sys.stdin.buffer.read())
    except (SpecClientError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
