"""Broker addresses (`mqtt://user:pass@host:port`) and a reachability check that speaks MQTT."""

from __future__ import annotations

import secrets
import socket
import struct
import time
from urllib.parse import unquote, urlsplit

import pydantic

DEFAULT_PORT = 1883
_HINT = "start Mosquitto or omit --broker to use the embedded one"
_CONNACK_REASONS = {
    1: "broker refused: unacceptable protocol version (it needs MQTT 3.1.1)",
    2: "broker refused the client id",
    3: "broker says the server is unavailable",
    4: "broker refused: bad username or password",
    5: "broker refused: not authorized",
}


class BrokerUnreachable(ConnectionError):
    """No MQTT broker answered at an address before the deadline."""


class BrokerAddress(pydantic.BaseModel, frozen=True):
    """Where an MQTT broker listens, with optional credentials."""

    host: str = pydantic.Field(min_length=1)
    port: int = pydantic.Field(default=DEFAULT_PORT, ge=1, le=65535)
    username: str | None = None
    password: str | None = pydantic.Field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The address as an mqtt:// URL for logs (the password is never shown)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"mqtt://{user}{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse(url: str) -> BrokerAddress:
    """Parse `mqtt://[user[:pass]@]host[:port]` or a bare `host[:port]` (default port 1883)."""
    text = url.strip()
    if not text:
        raise ValueError("empty MQTT broker address; expected mqtt://host[:port] or host:port")
    scheme, sep, _ = text.partition("://")
    if sep and scheme.lower() != "mqtt":
        extra = " (TLS is not supported yet)" if scheme.lower() in ("mqtts", "ssl") else ""
        raise ValueError(f"unsupported scheme {scheme!r} in broker address {url!r}{extra}; "
                         "expected mqtt://[user[:pass]@]host[:port]")
    parts = urlsplit(text if sep else f"//{text}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker address {url!r} must not have a path, query or fragment; "
                         "expected mqtt://[user[:pass]@]host[:port]")
    if not sep and parts.username is not None:
        raise ValueError(f"credentials need the mqtt:// form: mqtt://user:pass@host:port, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname:
        raise ValueError(f"no host in broker address {url!r}; expected mqtt://host[:port] or host:port")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"bad port in broker address {url!r}: must be 1-65535")
    return BrokerAddress(
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
    )


def wait_for_broker(address: BrokerAddress, timeout_s: float) -> None:
    """Return once an MQTT broker accepts a connection at `address`; raise BrokerUnreachable at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        reason = _probe(address, max(0.05, min(remaining, 2.0)))
        if reason is None:
            return
        if time.monotonic() + 0.1 >= deadline:
            raise BrokerUnreachable(
                f"cannot reach MQTT broker at {address.host}:{address.port} ({reason}) — {_HINT}")
        time.sleep(0.1)


def _probe(address: BrokerAddress, timeout_s: float) -> str | None:
    """One MQTT CONNECT/CONNACK round trip; None when accepted, else why not."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s) as sock:
            sock.sendall(_connect_packet(address))
            reply = _recv_exactly(sock, 4)
            if reply[0] != 0x20 or reply[1] != 0x02:
                return "the server there does not speak MQTT"
            if reply[3] != 0:
                return _CONNACK_REASONS.get(reply[3], f"broker refused with code {reply[3]}")
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean goodbye
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror:
        return "unknown host"
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _connect_packet(address: BrokerAddress) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and a random probe client id."""
    flags = 0x02
    payload = _utf8(f"tierfl-probe-{secrets.token_hex(4)}")
    if address.username is not None:
        flags |= 0x80
        payload += _utf8(address.username)
        if address.password is not None:
            flags |= 0x40
            payload += _utf8(address.password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 10) + payload
    return b"\x10" + _varint(len(body)) + body


def _utf8(text: str) -> bytes:
    """An MQTT length-prefixed UTF-8 string."""
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _varint(n: int) -> bytes:
    """The MQTT remaining-length encoding."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read n bytes or fail with ConnectionError on early close."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the server before answering")
        data += chunk
    return data
