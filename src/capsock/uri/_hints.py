"""Capability URIs, part 3: the direct route hints (``tcp=``, ``unix=``).

``via=`` hints name a whole capability, so they live with it in
:mod:`capsock.uri`.  Private: the public names are re-exported there.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from ..errors import InvalidCapability
from ._caveats import _check_int, _check_type

MAX_UNIX_PATH_BYTES = 107


MAX_DNS_NAME_LEN = 253


_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")


_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _canonical_host(host: object) -> str:
    """The canonical text of a tcp host (IP literal or DNS name), or raise."""
    host = _check_type("tcp hint host", host, str)
    if not host:
        raise InvalidCapability("tcp hint host is empty")
    if not host.isascii():
        raise InvalidCapability("tcp hint host must be ASCII (write IDNs in 'xn--' form)")
    if ":" in host:
        try:
            addr6 = ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidCapability("tcp hint host is not a valid IPv6 address") from None
        if addr6.scope_id is not None:
            raise InvalidCapability("tcp hint host: IPv6 zone ids ('%...') are not supported")
        if addr6.ipv4_mapped is not None:
            raise InvalidCapability("tcp hint host: use IPv4, not an IPv4-mapped IPv6 address")
        return addr6.compressed
    if _DIGITS_AND_DOTS.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise InvalidCapability("tcp hint host is not a valid IPv4 address") from None
    name = host.lower()
    if len(name) > MAX_DNS_NAME_LEN:
        raise InvalidCapability(f"tcp hint host name is longer than {MAX_DNS_NAME_LEN} characters")
    labels = name.split(".")
    if not all(_LDH_LABEL.fullmatch(label) for label in labels):
        raise InvalidCapability(
            "tcp hint host is not a valid DNS name (dot-separated labels of 1..63 letters, "
            "digits and inner '-'; no trailing dot)"
        )
    if labels[-1].isdigit():
        raise InvalidCapability("tcp hint host: the last label of a DNS name cannot be all digits")
    return name


@dataclass(frozen=True, slots=True)
class TcpHint:
    """Route hint ``tcp=HOST:PORT``: try a TCP connection to this address.

    The host is normalised on construction (IP literals to their canonical
    text, DNS names to lower case).

    Raises:
        InvalidCapability: the host is not an IPv4/IPv6 literal or a DNS name,
            or the port is not in 1..65535.
    """

    host: str
    """IPv4 dotted quad, IPv6 address (no brackets), or lower-case DNS name."""
    port: int
    """TCP port, 1..65535."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _canonical_host(self.host))
        _check_int("tcp hint port", self.port, 1, 65535)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp={host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixHint:
    """Route hint ``unix=/path``: try this Unix-domain socket (filesystem only).

    Raises:
        InvalidCapability: the path is not absolute, contains NUL, or is longer
            than 107 bytes of UTF-8.
    """

    path: str
    """Absolute filesystem path of the socket."""

    def __post_init__(self) -> None:
        path = _check_type("unix hint path", self.path, str)
        if not path.startswith("/"):
            raise InvalidCapability("unix hint path must be absolute (start with '/')")
        if "\x00" in path:
            raise InvalidCapability("unix hint path contains NUL")
        try:
            size = len(path.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidCapability("unix hint path is not encodable as UTF-8") from None
        if size > MAX_UNIX_PATH_BYTES:
            limit = MAX_UNIX_PATH_BYTES
            raise InvalidCapability(f"unix hint path is {size} bytes, at most {limit} allowed")

    def __str__(self) -> str:
        return "unix=" + urllib.parse.quote(self.path, safe="/")
