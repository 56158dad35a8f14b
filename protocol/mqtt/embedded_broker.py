"""An in-process MQTT 3.1.1 broker (amqtt) for one-command runs, demos and tests; use Mosquitto in production.

amqtt 0.12.1 notes that shape this module:
- We bind the listening socket ourselves and hand accepted connections to amqtt through an
  "external" listener (`Broker.stream_connected`). So port 0 means a free port chosen by the
  kernel with no pick-then-bind race, and a taken port is a plain OSError we can explain
  instead of amqtt's logged traceback.
- Authentication is a plugin that must answer True, or every client is refused. The bundled
  AnonymousAuthPlugin marks every session anonymous, and amqtt then drops persistent
  sessions (clean_session=False) on disconnect and queues nothing for them; `_AcceptAll`
  accepts everyone without that flag, so offline QoS 1 queueing works as with Mosquitto.
- On connect, 0.12.1 sends a client the retained messages matching *every* client's
  subscriptions, even ones it never subscribed to (and twice once it does). `_Broker` sends
  retained messages only for the client's own subscriptions, as Mosquitto does.
- A TCP connection that closes without a CONNECT (a port probe) is logged at ERROR; we drop
  those records. Use `protocol.mqtt.url.wait_for_broker`, which speaks MQTT, to probe.
- No $SYS plugin, no persistence plugin, no packet/event logger plugins.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import threading
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

logger = logging.getLogger(__name__)

_LISTENER = "default"
_NOISY_LOGGERS = ("amqtt", "transitions")


class BrokerStartError(OSError):
    """The embedded broker could not start (typically: the port is taken)."""


class _AcceptAll(BaseAuthPlugin):
    """amqtt auth plugin: accept every client and keep persistent sessions persistent."""

    async def authenticate(self, *, session: Session) -> bool:
        """Accept the client."""
        return True


class _Broker(Broker):
    """amqtt's Broker, sending retained messages only for the client's own subscriptions."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        subscribers = self._subscriptions.get(subscription[0], ())
        if any(other.client_id == session.client_id for other, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


class _DropEmptyConnections(logging.Filter):
    """Hide amqtt's ERROR for a TCP connection that closed before sending CONNECT (a port probe)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record except the empty-connection ones."""
        return "No data" not in record.getMessage()


def _broker_config() -> dict[str, Any]:
    """amqtt 0.12 config: one external listener fed by our socket, open auth, no other plugins."""
    return {
        "listeners": {_LISTENER: {"type": "external"}},
        "plugins": {f"{__name__}._AcceptAll": {}},
    }


def _quiet_amqtt() -> None:
    """Put amqtt's chatty loggers at WARNING unless someone already chose a level for them."""
    for name in _NOISY_LOGGERS:
        named = logging.getLogger(name)
        if named.level == logging.NOTSET:
            named.setLevel(logging.WARNING)
    broker_logger = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _DropEmptyConnections) for f in broker_logger.filters):
        broker_logger.addFilter(_DropEmptyConnections())


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port (0 = a free port), or raise BrokerStartError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except socket.gaierror as exc:
        raise BrokerStartError(f"cannot start the embedded MQTT broker: unknown host {host!r}") from exc
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BrokerStartError(
                f"cannot start the embedded MQTT broker: {host}:{port} is already in use "
                "(is Mosquitto or another broker running there? choose another --port)") from exc
        raise BrokerStartError(f"cannot start the embedded MQTT broker on {host}:{port}: {exc.strerror or exc}") from exc


class EmbeddedBroker:
    """amqtt on its own event loop in a daemon thread; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, start_timeout_s: float = 10.0) -> None:
        self._host = host
        self._port = port
        self._start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        """The address the broker listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The TCP port the broker listens on (known once started when created with port 0)."""
        if self._port == 0:
            raise RuntimeError("the embedded broker has no port until it is started")
        return self._port

    @property
    def url(self) -> str:
        """`mqtt://host:port` for clients."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Bind, start amqtt in a daemon thread and return once it accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the embedded broker is already started")
        _quiet_amqtt()
        sock = _listen(self._host, self._port)
        self._port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sock,), name=f"mqtt-broker-{self._port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            self.stop()
            raise BrokerStartError(f"the embedded MQTT broker did not start within {self._start_timeout_s:g} s")
        if self._error is not None:
            self._thread.join(self._start_timeout_s)
            raise BrokerStartError(f"cannot start the embedded MQTT broker: {self._error}") from self._error
        logger.debug("embedded MQTT broker listening on %s", self.url)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Disconnect every client, close the listener and join the thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or not thread.is_alive():
            return
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed: the thread is on its way out
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning("embedded MQTT broker thread did not stop within %.0f s", timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self, sock: socket.socket) -> None:
        """Thread body: one asyncio loop for the broker's whole life."""
        try:
            asyncio.run(self._serve(sock))
        except BaseException as exc:  # surface start-up failures to start(); log later ones
            if not self._ready.is_set():
                self._error = exc
            else:
                logger.exception("embedded MQTT broker stopped with an error")
        finally:
            sock.close()
            self._ready.set()

    async def _serve(self, sock: socket.socket) -> None:
        """Start amqtt, feed it our socket's connections, and shut both down on stop()."""
        self._loop = asyncio.get_running_loop()
        broker = _Broker(_broker_config(), loop=self._loop)
        await broker.start()
        streams: set[asyncio.StreamWriter] = set()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            streams.add(writer)
            try:
                await broker.stream_connected(reader, writer, listener_name=_LISTENER)
            finally:
                streams.discard(writer)

        server = await asyncio.start_server(handler, sock=sock)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            # Python 3.11's Server.close() leaves accepted connections open, and amqtt's shutdown
            # can stall on them while still routing; cut every client off first, as a dead broker would.
            server.close()
            for writer in list(streams):
                writer.transport.abort()
            try:
                await asyncio.wait_for(broker.shutdown(), timeout=5)
            except (TimeoutError, asyncio.TimeoutError):
                logger.warning("embedded MQTT broker shutdown took over 5 s; abandoning it")
            await asyncio.wait_for(server.wait_closed(), timeout=5)


def run_broker_forever(host: str = "127.0.0.1", port: int = 1883) -> None:
    """Serve an embedded broker in the foreground until SIGINT or SIGTERM (main thread only)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedBroker(host, port) as broker:
            logger.info("embedded MQTT broker listening on %s (Ctrl-C to stop)", broker.url)
            while not stop.wait(0.5):
                pass
            logger.info("stopping the embedded MQTT broker")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _port_arg(text: str) -> int:
    """argparse type: a TCP port, 0 meaning any free port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0 = any free port), got {port}")
    return port


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl broker` options and description to `parser`."""
    parser.description = (
        "Run a small pure-Python MQTT 3.1.1 broker (amqtt) in the foreground, for laptops, demos and "
        "tests. It is several times slower than Mosquitto, keeps nothing on disk and has no "
        "authentication: for production run Mosquitto (or a clustered broker) and point devices "
        "and the aggregator at it with --broker mqtt://HOST:PORT. Stop it with Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 to accept devices on the LAN)")
    parser.add_argument("--port", type=_port_arg, default=1883,
                        help="TCP port to listen on (default: %(default)s; 0 picks a free port)")


def run(args: argparse.Namespace) -> int:
    """`tierfl broker`: serve until interrupted; 0 on a clean stop, 1 if the broker cannot start."""
    try:
        run_broker_forever(args.host, args.port)
    except BrokerStartError as exc:
        logger.error("%s", exc)
        return 1
    return 0
