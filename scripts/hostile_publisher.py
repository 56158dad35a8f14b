"""A hostile publisher: raw paho-mqtt sending what an attacker with one device's broker access would.

For the live hostile-input test and benchmark (tests/test_hostile_live.py, scripts/bench_hostile.py):
each case below is one class of issue 13's list, built as raw bytes (not through our encoder where
the encoder would refuse to build it), published on the fleet's topics of device `--device`.

    .venv/bin/python scripts/hostile_publisher.py --broker mqtt://127.0.0.1:1883 --fleet lab --case all
    .venv/bin/python scripts/hostile_publisher.py --broker mqtt://127.0.0.1:1883 --fleet lab --case poison --for 60

`poison` takes part in rounds: it answers every task with an update claiming 10^9 samples, then one
with a 3e38 delta, then an honest zero update, so the round can still finish without waiting for it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from protocol.chunking import CHUNK_MAGIC
from protocol.frame import MAGIC, decode_frame, encode_frame
from protocol.messages import Hello, TrainTask, Update, new_id
from protocol.mqtt.url import parse
from protocol.topics import Topics

Message = tuple[str, bytes, bool]  # topic, payload, retain
SHA = "ab" * 32


def raw_frame(fleet: str, sender: str, body: dict, tensors: list[dict] | None = None, payload: bytes = b"") -> bytes:
    """Frame bytes around a header written as plain JSON: any value, however large, goes in as it is."""
    header = {"protocol": 1, "fleet": fleet, "sender": sender, "msg_id": new_id(), "sent_at": time.time(),
              "body": body, "tensors": tensors or [], "payload_sha256": hashlib.sha256(payload).hexdigest()}
    text = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + payload


def _update(**overrides: object) -> dict:
    body = {"kind": "update", "update_id": new_id(), "round": 1, "base_version": 0, "tier": "a", "num_samples": 10,
            "steps": 1, "train_loss": 1.0, "train_accuracy": 0.5, "train_seconds": 0.1}
    return {**body, **overrides}


def _entry(name: str, codec: str, shape: list[int], nbytes: int, **meta: object) -> dict:
    dtype = "uint8" if codec == "uint8" else "float32"
    return {"name": name, "codec": codec, "dtype": dtype, "shape": shape, "nbytes": nbytes, "meta": meta}


def zero_dim(fleet: str, me: str, topics: Topics) -> Iterator[Message]:
    """Case 1: a zero dimension next to huge ones (the element count is 0, the shape is not), also retained."""
    for shape, codec in (([0, 2**40, 2**40], "float32"), ([0, 2**62], "int8-row"), ([2**31, 0], "int4")):
        meta = {"scale": 0.1} if codec == "int4" else {}
        frame = raw_frame(fleet, me, _update(), [_entry("fc1.weight", codec, shape, 0, **meta)])
        yield topics.up(me), frame, False
    other = f"{me}-zero"  # its own device id: the poisoner keeps `me` announced
    hello = raw_frame(fleet, other, {"kind": "hello", "num_samples": 10}, [_entry("x", "float32", [0, 2**60], 0)])
    yield topics.status(other), hello, True  # delivered again at every start of the aggregator


def huge_ints(fleet: str, me: str, topics: Topics) -> Iterator[Message]:
    """Case 2: integers past int64 and past any float, in updates and in a retained hello."""
    for field, value in (("round", 2**63), ("round", 10**400), ("num_samples", 2**63), ("eval_samples", 2**70),
                         ("steps", 10**30), ("base_version", -(2**63) - 1)):
        yield topics.up(me), raw_frame(fleet, me, _update(**{field: value})), False
    yield topics.status(f"{me}-big"), raw_frame(fleet, f"{me}-big", {"kind": "hello", "num_samples": 2**63,
                                                                     "num_test_samples": 10**400}), True


def sparse_bomb(fleet: str, me: str, topics: Topics) -> Iterator[Message]:
    """Case 3: a few kB of top-k that declare 60 million elements; a header holding 5,000 tensors."""
    n = 60_000_000
    bitmap = bytearray((n + 7) // 8)
    bitmap[0] = 0x80
    data = struct.pack("<I", 1) + zlib.compress(bytes(bitmap) + struct.pack("<f", 1.0), 9)
    yield topics.up(me), raw_frame(fleet, me, _update(), [_entry("fc1.weight", "topk", [n], len(data))], data), False
    many = [_entry(f"t{i}", "float32", [1], 4) for i in range(5000)]
    yield topics.up(me), raw_frame(fleet, me, _update(), many, bytes(4 * 5000)), False


def _chunk(transfer: str, index: int, count: int, total: int, piece: bytes) -> bytes:
    header = json.dumps({"transfer_id": transfer, "index": index, "count": count, "total_bytes": total}).encode()
    return CHUNK_MAGIC + struct.pack("<I", len(header)) + header + piece


def chunks(fleet: str, me: str, topics: Topics) -> Iterator[Message]:
    """Case 4: 2,000 transfers opened by empty pieces; 300 transfers holding 64 kB each, never completed."""
    for _ in range(2000):
        yield topics.up(me), _chunk(new_id(), 0, 1000, 60 << 20, b""), False
    piece = bytes(64 << 10)
    for _ in range(300):
        yield topics.up(me), _chunk(new_id(), 0, 1000, 60 << 20, piece), False


def floods(fleet: str, me: str, topics: Topics) -> Iterator[Message]:
    """Case 7: garbage, well-formed refusals, hellos of 2,000 invented devices, unbounded strings."""
    for i in range(2000):
        yield topics.up(me), b"\x00not a frame %d" % i, False
    for _ in range(2000):
        yield topics.up(me), raw_frame(fleet, me, _update(round=1)), False
    for i in range(2000):
        device = f"{me}-fake{i}"
        yield topics.status(device), encode_frame(fleet, device, Hello(num_samples=10)), False
    yield topics.status(me), raw_frame(fleet, me, {"kind": "hello", "num_samples": 10, "backend": "x" * 500_000}), False
    libraries = {f"lib{i}": "1.0" for i in range(20_000)}
    yield topics.status(me), raw_frame(fleet, me, {"kind": "hello", "num_samples": 10, "libraries": libraries}), False
    yield topics.up(me), raw_frame(fleet, me, {"kind": "fetch", "sha256": [SHA] * 64}), False


def downlink(fleet: str, me: str, topics: Topics, devices: list[str]) -> Iterator[Message]:
    """Case 6: frames on honest devices' downlink claiming to be the aggregator: unsigned tasks of every bad kind."""
    for device in devices:
        task = {"kind": "train", "round": 1, "model_version": 0, "tier": "a", "manifest_sha256": SHA,
                "artifacts": {f"f{i}.onnx": f"{i:064x}" for i in range(100)}, "epochs": 1, "batch_size": 8,
                "learning_rate": 0.1, "deadline": time.time() + 600}
        yield topics.down(device), raw_frame(fleet, "aggregator", task), False
        wrong = np.zeros((3, 3), np.float32)
        body = {**task, "artifacts": {"manifest.json": SHA}, "round": 2}
        yield topics.down(device), raw_frame(fleet, "aggregator", body, [_entry("fc1.weight", "float32", [3, 3], 36)],
                                             wrong.tobytes()), False
        yield topics.down(device), b"TFL1\xff\xff\xff\xff garbage", False


CASES: dict[str, Callable[[str, str, Topics], Iterator[Message]]] = {
    "zero-dim": zero_dim, "huge-ints": huge_ints, "sparse-bomb": sparse_bomb, "chunks": chunks, "floods": floods,
}


class Poisoner:
    """A participant that answers each task with a forged sample count, then an overflowing delta, then zeros."""

    def __init__(self, client: mqtt.Client, fleet: str, me: str, topics: Topics) -> None:
        self.client, self.fleet, self.me, self.topics = client, fleet, me, topics
        self.answered: set[int] = set()
        self._seen: set[str] = set()  # task message ids: a task sent again after a restart is answered again
        self.lock = threading.Lock()

    def on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        """Answer a task on our downlink (each round once)."""
        try:
            frame = decode_frame(message.payload)
        except ValueError:
            return
        task = frame.body
        if not isinstance(task, TrainTask) or task.secure is not None:
            return
        with self.lock:
            if frame.header.msg_id in self._seen:
                return
            self._seen.add(frame.header.msg_id)
            self.answered.add(task.round)
        zeros = {name: np.zeros(np.shape(value), np.float32) for name, value in frame.tensors.items()}
        huge = {name: np.full(np.shape(value), 3e38, np.float32) for name, value in frame.tensors.items()}
        for samples, tensors in ((10**9, zeros), (10, huge), (10, zeros)):
            update = Update.model_construct(update_id=new_id(), round=task.round, base_version=task.model_version, tier=task.tier,
                            num_samples=samples, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1,
                            eval_loss=None, eval_accuracy=None, eval_samples=0, unchanged=False, contributors=None)
            self.client.publish(self.topics.up(self.me), encode_frame(self.fleet, self.me, update, tensors), qos=1)


def connect(url: str, client_id: str) -> mqtt.Client:
    """A plain paho client, connected, its network loop running."""
    address = parse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv311)
    if address.username:
        client.username_pw_set(address.username, address.password)
    client.connect(address.host, address.port)
    client.loop_start()
    return client


def publish_all(client: mqtt.Client, messages: Iterator[Message]) -> int:
    """Publish every message at QoS 1 and wait for the broker to take them; returns how many."""
    count = 0
    last = None
    for topic, payload, retain in messages:
        last = client.publish(topic, payload, qos=1, retain=retain)
        count += 1
        if count % 200 == 0:
            last.wait_for_publish(30)
    if last is not None:
        last.wait_for_publish(30)
    return count


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases against a fleet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True, help="mqtt://host:port of the fleet's broker")
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--device", default="mallory", help="the device id whose topics the attacker uses")
    parser.add_argument("--case", action="append", choices=[*CASES, "downlink", "poison", "all"], required=True)
    parser.add_argument("--victims", default="", help="downlink: comma-separated honest device ids")
    parser.add_argument("--for", dest="seconds", type=float, default=60.0, help="poison: how long to take part")
    parser.add_argument("--repeat-for", type=float, default=0.0, metavar="S",
                        help="send the cases again and again for S seconds (a flood; default: once)")
    args = parser.parse_args(argv)
    topics = Topics(args.fleet)
    client = connect(args.broker, f"hostile-{new_id()[:8]}")
    cases = [*CASES, "downlink"] if "all" in args.case else [c for c in args.case if c != "poison"]
    until = time.monotonic() + args.repeat_for
    while cases:
        for name in cases:
            started = time.perf_counter()
            if name == "downlink":
                messages = downlink(args.fleet, args.device, topics, [v for v in args.victims.split(",") if v])
            else:
                messages = CASES[name](args.fleet, args.device, topics)
            count = publish_all(client, messages)
            print(f"{name}: published {count} messages in {time.perf_counter() - started:.1f} s", flush=True)
        if time.monotonic() >= until:
            break
    if "poison" in args.case:
        poisoner = Poisoner(client, args.fleet, args.device, topics)
        client.on_message = poisoner.on_message
        client.subscribe(topics.down(args.device), qos=1)
        hello = encode_frame(args.fleet, args.device, Hello(num_samples=10))
        client.publish(topics.status(args.device), hello, qos=1, retain=True).wait_for_publish(10)
        time.sleep(args.seconds)
        print(f"poison: answered rounds {sorted(poisoner.answered)}", flush=True)
    client.loop_stop()
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
