"""One network thread for many MQTT clients: a selector over their sockets, and timers.

paho-mqtt's `loop_start` gives every client a thread of its own; a virtual fleet of thousands of
devices (edge_client.fleet) instead attaches every client to one `NetLoop`, which waits on all
their sockets at once (selectors: epoll on Linux) and calls paho's `loop_read`, `loop_write` and
`loop_misc` (keep-alive pings): a tenth of the clients each second, so every client every 10 s,
well within the 30 s keep-alive, at a cost that does not jump with the fleet's size. paho tells the loop when a socket
opens, closes or has bytes to write through its socket callbacks.

Everything that touches a paho client runs on the loop's thread: connecting, publishing,
disconnecting. Other threads hand such work over with `call_soon` or `call_at`, which wake the
loop through a socket pair; so paho's state is never shared between threads (a publish from another
thread could race the loop's "nothing left to write" and sit unsent).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)
MISC_EVERY_S = 1.0  # loop_misc (keep-alive) for a share of the clients this often
MISC_SHARE = 10  # ... a 1/MISC_SHARE share: each client every MISC_SHARE x MISC_EVERY_S seconds


class NetLoop:
    """Drives many paho clients from one thread."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._clients: dict[mqtt.Client, None] = {}  # in order of attachment (a set of them, ordered)
        self._misc_turn = 0
        self._lock = threading.Lock()  # guards _timers and _woken (call_soon/call_at come from any thread)
        self._timers: list[tuple[float, int, Callable[[], object]]] = []  # (monotonic time, seq, call)
        self._seq = itertools.count()
        self._woken = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tierfl-netloop", daemon=True)
        self.busy_s = 0.0  # seconds spent working (not waiting in select), for the fleet's own statistics

    # -- from any thread ----------------------------------------------------------------------

    def call_soon(self, call: Callable[[], object]) -> None:
        """Run `call()` on the loop's thread, as soon as it can."""
        self.call_at(0.0, call)

    def call_later(self, delay_s: float, call: Callable[[], object]) -> None:
        """Run `call()` on the loop's thread after `delay_s` seconds."""
        self.call_at(time.monotonic() + max(0.0, delay_s), call)

    def call_at(self, when: float, call: Callable[[], object]) -> None:
        """Run `call()` on the loop's thread at monotonic time `when` (or as soon as it can after)."""
        with self._lock:
            heapq.heappush(self._timers, (when, next(self._seq), call))
            wake = not self._woken and threading.current_thread() is not self._thread
            self._woken = self._woken or wake
        if wake:
            try:
                self._wake_w.send(b"x")
            except BlockingIOError:  # the pair is full of wake-ups already
                pass

    def start(self) -> None:
        """Start the loop's thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (after the calls already due) and wait for its thread."""
        self._stop.set()
        self.call_soon(lambda: None)
        self._thread.join(timeout_s)

    @property
    def on_loop(self) -> bool:
        """True on the loop's own thread."""
        return threading.current_thread() is self._thread

    # -- on the loop's thread ---------------------------------------------------------------------

    def attach(self, client: mqtt.Client) -> None:
        """Drive `client` from this loop: call before its first connect, on the loop's thread."""
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written
        self._clients[client] = None

    def detach(self, client: mqtt.Client) -> None:
        """Stop driving `client` (after its socket closed)."""
        self._clients.pop(client, None)

    def _socket_open(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _socket_close(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _written(self, client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            self._selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self._stop.is_set():
            with self._lock:
                first = self._timers[0][0] if self._timers else None
            now = time.monotonic()
            timeout = max(0.0, min(next_misc, first if first is not None else next_misc) - now)
            events = self._selector.select(timeout)
            began = time.perf_counter()
            for key, mask in events:
                client = key.data
                if client is None:
                    self._drain_wake()
                    continue
                if mask & selectors.EVENT_READ:
                    self._guarded(client.loop_read)
                if mask & selectors.EVENT_WRITE:
                    self._guarded(client.loop_write)
            self._run_due()
            if (now := time.monotonic()) >= next_misc:
                next_misc = now + MISC_EVERY_S
                clients = list(self._clients)
                for client in clients[self._misc_turn % MISC_SHARE::MISC_SHARE]:
                    self._guarded(client.loop_misc)
                self._misc_turn += 1
            self.busy_s += time.perf_counter() - began
        self._selector.close()

    def _drain_wake(self) -> None:
        with self._lock:
            self._woken = False
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _run_due(self) -> None:
        """Run every call whose time has come (those added meanwhile wait for the next turn)."""
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for call in due:
            self._guarded(call)

    @staticmethod
    def _guarded(call: Callable[[], object]) -> None:
        try:
            call()
        except Exception:  # one client's failure must not stop the loop of all
            log.exception("network loop: a call failed")
