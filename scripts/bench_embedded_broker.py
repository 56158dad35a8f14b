"""The embedded broker's limits against Mosquitto's (issue 16): connections held and QoS 1 messages per second.

Connections: N raw MQTT 3.1.1 clients (one socket each: CONNECT, wait for CONNACK, keep open) opened one after
another; the time to connect them all, and whether the broker still answers a new client after them.
Messages: one paho publisher at QoS 1 (100 in flight) to one subscriber, COUNT messages of SIZE bytes; messages per
second from the first publish to the last delivery. Prints JSON lines and writes benchmarks/embedded_broker.json.

    nice -n 19 .venv/bin/python scripts/bench_embedded_broker.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_hierarchy import raise_file_limit  # noqa: E402 (a sibling script)
from bench_hostile import _start_mosquitto, stop  # noqa: E402

from protocol.mqtt.embedded_broker import EmbeddedBroker  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _connect_packet(client_id: str) -> bytes:
    name = b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol name, level 4, clean session, keepalive 60 s
    body = name + struct.pack("!H", len(client_id)) + client_id.encode()
    return bytes([0x10, len(body)]) + body


def connections(port: int, count: int) -> dict[str, float]:
    """Open `count` MQTT connections and hold them; seconds taken, and whether a new client still gets a CONNACK."""
    held: list[socket.socket] = []
    started = time.perf_counter()
    opened = 0
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(_connect_packet(f"c{i}-{os.getpid()}"))
            if sock.recv(4)[:1] != b"\x20":
                break
            held.append(sock)
            opened += 1
        elapsed = time.perf_counter() - started
        probe = socket.create_connection(("127.0.0.1", port), timeout=10)
        probe.sendall(_connect_packet(f"probe-{os.getpid()}"))
        answers = probe.recv(4)[:1] == b"\x20"
        probe.close()
    except OSError:
        elapsed, answers = time.perf_counter() - started, False
    finally:
        for sock in held:
            sock.close()
    return {"connections": opened, "seconds": elapsed, "per_second": opened / elapsed if elapsed else 0.0,
            "still_answers": answers}


def throughput(port: int, count: int, size: int) -> dict[str, float]:
    """QoS 1 messages of `size` bytes from one publisher to one subscriber: messages per second."""
    got = threading.Event()
    received = [0]

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received[0] += 1
        if received[0] == count:
            got.set()

    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{os.getpid()}-{size}")
    subscriber.on_message = on_message
    subscriber.connect("127.0.0.1", port)
    subscriber.subscribe("bench/t", qos=1)
    subscriber.loop_start()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}-{size}")
    publisher.max_inflight_messages_set(100)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    time.sleep(0.5)
    payload = os.urandom(size)
    started = time.perf_counter()
    for _ in range(count):
        publisher.publish("bench/t", payload, qos=1)
    done = got.wait(120)
    elapsed = time.perf_counter() - started
    for client in (publisher, subscriber):
        client.loop_stop()
        client.disconnect()
    return {"messages": received[0], "size": size, "seconds": elapsed, "per_second": received[0] / elapsed,
            "complete": done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "embedded_broker.json")
    args = parser.parse_args()
    raise_file_limit()
    results = []
    with EmbeddedBroker() as broker:
        for name, value in (("connections", connections(broker.port, args.connections)),
                            ("qos1_1kB", throughput(broker.port, args.messages, 1024)),
                            ("qos1_100kB", throughput(broker.port, args.messages // 10, 100 * 1024))):
            results.append({"broker": "embedded (amqtt)", "test": name, **value})
            print(json.dumps(results[-1]), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    mosquitto, url = _start_mosquitto(folder, "max_queued_messages 100000\n", raise_file_limit)
    port = int(url.rsplit(":", 1)[1])
    try:
        for name, value in (("connections", connections(port, args.connections)),
                            ("qos1_1kB", throughput(port, args.messages, 1024)),
                            ("qos1_100kB", throughput(port, args.messages // 10, 100 * 1024))):
            results.append({"broker": "Mosquitto 2.0", "test": name, **value})
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop([mosquitto])
        shutil.rmtree(folder, ignore_errors=True)
    command = " ".join(["nice -n 19 .venv/bin/python scripts/bench_embedded_broker.py", *sys.argv[1:]])
    args.out.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
