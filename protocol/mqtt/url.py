"""Broker addresses (`mqtt://user:pass@host:port`, TLS: `mqtts://...?ca=FILE`) and a reachability check speaking MQTT."""

from __future__ import annotations

import secrets
import socket
import ssl
import struct
import time
from urllib.parse import parse_qsl, unquote, urlsplit

import pydantic

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
_FORM = "expected mqtt://[user[:pass]@]host[:port] or mqtts://[user[:pass]@]host[:port][?ca=CA_FILE]"
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
    tls: bool = False
    ca_file: str | None = None  # with tls: the CA that signed the broker's certificate; None: the system's CAs

    @property
    def url(self) -> str:
        """The address as an mqtt:// or mqtts:// URL for logs (the password is never shown)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        ca = f"?ca={self.ca_file}" if self.ca_file else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}{ca}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """For a TLS address, a context that verifies the broker against `ca_file` (or the system's CAs);
        ValueError if the CA file cannot be read."""
        if not self.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:  # a missing file, or one that holds no PEM certificate
            raise ValueError(f"cannot load the CA file {self.ca_file!r} of {self.url}: {exc}") from None

    def __str__(self) -> str:
        return self.url


def parse(url: str) -> BrokerAddress:
    """Parse `mqtt://[user[:pass]@]host[:port]` or a bare `host[:port]` (default port 1883), or
    `mqtts://[user[:pass]@]host[:port][?ca=CA_FILE]` for TLS (default port 8883; without `ca`, the
    broker's certificate must be signed by a CA the system trusts)."""
    text = url.strip()
    if not text:
        raise ValueError("empty MQTT broker address; expected mqtt://host[:port] or host:port")
    scheme, sep, _ = text.partition("://")
    if sep and scheme.lower() not in ("mqtt", "mqtts"):
        raise ValueError(f"unsupported scheme {scheme!r} in broker address {url!r}; {_FORM}")
    tls = scheme.lower() == "mqtts"
    parts = urlsplit(text if sep else f"//{text}")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueError(f"broker address {url!r} must not have a path or fragment; {_FORM}")
    params = parse_qsl(parts.query, keep_blank_values=True)
    if params and (not tls or len(params) != 1 or params[0][0] != "ca" or not params[0][1]):
        raise ValueError(f"broker address {url!r}: the only query an address may have is ?ca=CA_FILE, "
                         f"with mqtts://; {_FORM}")
    ca_file = params[0][1] if params else None
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
        port=(DEFAULT_TLS_PORT if tls else DEFAULT_PORT) if port is None else port,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
        tls=tls,
        ca_file=ca_file,
    )


def wait_for_broker(address: BrokerAddress, timeout_s: float) -> None:
    """Return once an MQTT broker accepts a connection at `address`; raise BrokerUnreachable at the deadline."""
    deadline = time.monotonic() + timeout_s
    context = address.ssl_context()
    while True:
        remaining = deadline - time.monotonic()
        reason = _probe(address, context, max(0.05, min(remaining, 2.0)))
        if reason is None:
            return
        if time.monotonic() + 0.1 >= deadline:
            raise BrokerUnreachable(
                f"cannot reach MQTT broker at {address.host}:{address.port} ({reason}) — {_HINT}")
        time.sleep(0.1)


def _probe(address: BrokerAddress, context: ssl.SSLContext | None, timeout_s: float) -> str | None:
    """One MQTT CONNECT/CONNACK round trip (inside TLS with a context); None when accepted, else why not."""
    try:
        with _open(address, context, timeout_s) as sock:
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
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the broker's certificate is not trusted ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc})"
    except socket.gaierror:
        return "unknown host"
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _open(address: BrokerAddress, context: ssl.SSLContext | None, timeout_s: float) -> socket.socket:
    """A TCP connection to the broker, inside TLS with a context."""
    sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
    if context is None:
        return sock
    try:
        return context.wrap_socket(sock, server_hostname=address.host)
    except BaseException:
        sock.close()
        raise


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


def mask_password(text: str, mask: str = "***") -> str:
    """`text` with the password of a URL in it replaced by `mask` (anything that is no such URL unchanged)."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if password is None:
        return text
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:{mask}@{host}").geturl()
