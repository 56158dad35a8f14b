"""Federated analytics on a live fleet: an aggregator (mlp8) training rounds and three device processes on
Dirichlet shards of digits over Mosquitto; `tierfl analytics`' queries checked against the shards themselves,
then a label histogram summed by secure aggregation with a fourth device dropping out after sharing its keys."""

from __future__ import annotations

import argparse
import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from aggregator.analytics import TOKEN_FILE, AnalyticsRequest
from aggregator.analytics_cli import EXIT_REFUSED, ask, configure_parser, run
from aggregator.report import load_run, render
from edge_client.secure_client import secure_params
from models.analytics import QuerySpec, true_answer
from models.data import Dataset, dirichlet_partition, load_digits, save_npz, train_test_split
from protocol.frame import decode_frame, encode_frame
from protocol.messages import Hello, Query, SecAgg, Status, new_id
from protocol.mqtt.link import MqttLink
from protocol.mqtt.url import parse as parse_broker
from protocol.secagg.device import SecAggDevice
from protocol.secagg.wire import unwrap, wrap
from protocol.topics import Topics
from tests.conftest import tierfl
from tests.test_integration import _stop, _wait_for

pytestmark = pytest.mark.integration
DEVICES = 3


def _shards(folder: Path) -> list[tuple[Dataset, Dataset]]:
    """Three label-skewed shards of digits, written as .npz; each device's (train, test) as `tierfl client` splits."""
    data = load_digits()
    parts = dirichlet_partition(data.y, DEVICES, alpha=0.5, seed=3)
    splits = []
    for i, part in enumerate(parts):
        shard = data.subset(np.sort(part))
        save_npz(folder / f"shard{i}.npz", shard)
        splits.append(train_test_split(shard, 0.2, seed=0))
    return splits


class DroppingDevice:
    """A device of 100 samples that takes part in a secure query up to sharing its keys, then goes offline."""

    def __init__(self, url: str, fleet: str, device_id: str) -> None:
        self.fleet, self.device_id, self.topics = fleet, device_id, Topics(fleet)
        self.session, self.shared, self.secagg = new_id(), False, None
        self.link = MqttLink(parse_broker(url), f"tierfl-{fleet}-{device_id}", [self.topics.down(device_id)],
                             self._on_frame, lambda topic, error: None)
        assert self.link.start(timeout_s=10)
        self._publish(self.topics.status(device_id), Hello(num_samples=100, session=self.session), retain=True)

    def _publish(self, topic: str, body, tensors=None, retain: bool = False) -> None:
        self.link.publish(topic, encode_frame(self.fleet, self.device_id, body, tensors, "uint8"), retain=retain)

    def _on_frame(self, topic: str, data: bytes) -> None:
        body = decode_frame(data).body
        if isinstance(body, Query) and body.secure is not None:
            self.secagg = (SecAggDevice(self.device_id, secure_params(body), body.secure.block,
                                        session=body.secure.session), body.secure.session)
            self._publish(self.topics.up(self.device_id), *wrap(self.secagg[0].advertise(), self.secagg[1]))
        elif isinstance(body, SecAgg) and body.phase == "roster" and self.secagg is not None:
            shares = self.secagg[0].share_keys(unwrap(body, {}))
            self._publish(self.topics.up(self.device_id), *wrap(shares, self.secagg[1]))
            self._publish(self.topics.status(self.device_id), Status(online=False, session=self.session), retain=True)
            self.shared = True  # and silent from here on: no masked input

    def stop(self) -> None:
        self.link.stop(flush_timeout_s=2)


def test_queries_answered_from_the_fleet(tmp_path, mosquitto_url, fleet, capsys):
    splits = _shards(tmp_path)
    log = tmp_path / "aggregator.log"
    state = tmp_path / "state"
    processes = [tierfl("aggregator", "--broker", mosquitto_url, "--fleet", fleet, "--state-dir", str(state),
                        "--min-clients", str(DEVICES), "--rounds", "200", "--round-timeout", "30", "--epochs", "1",
                        "--tiers", "a,b", "--tier-mix", "a-b",
                        "--status-port", "0", log=log)]
    processes += [tierfl("client", "--broker", mosquitto_url, "--fleet", fleet, "--device-id", f"d{i}", "--data",
                         str(tmp_path / f"shard{i}.npz"), "--cache-dir", str(tmp_path / f"d{i}"),
                         log=tmp_path / f"d{i}.log") for i in range(DEVICES)]
    try:
        served = re.compile(r"status page at (http://127\.0\.0\.1:\d+/)")
        _wait_for(lambda: served.search(log.read_text()), 60, "the status page")
        url = served.search(log.read_text()).group(1)

        def status() -> dict:
            with urllib.request.urlopen(url + "status.json", timeout=10) as response:
                return json.loads(response.read())

        _wait_for(lambda: log.read_text().count("joined") >= DEVICES, 60, "three devices")
        token = (state / TOKEN_FILE).read_text().strip()
        card = status()["model_card"]
        trains = [train for train, _ in splits]

        def spec(computation: str, **extra) -> QuerySpec:
            return QuerySpec(computation, tuple(card["input_shape"]), card["num_classes"], **extra)

        # exact answers, checked against the shards (the CLI's own function posts and polls)
        histogram = ask(url, token, AnalyticsRequest(computation="label_histogram"), wait_s=60)
        assert histogram["status"] == "answered", histogram
        assert histogram["answered"] == DEVICES and histogram["privacy"]["dp"] is False
        assert histogram["answer"]["counts"] == true_answer(spec("label_histogram"), trains)["counts"].tolist()
        assert sorted(histogram["diagnostics"]["samples_per_device"]) == sorted(float(len(t)) for t in trains)

        moments = ask(url, token, AnalyticsRequest(computation="feature_moments", low=0, high=1), wait_s=60)
        truth = true_answer(spec("feature_moments"), trains)
        assert moments["answer"]["count"] == truth["count"][0]
        n = truth["count"][0] * spec("feature_moments").positions  # values per channel
        np.testing.assert_allclose(moments["answer"]["mean"], truth["sum"] / n, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moments["answer"]["variance"], truth["sum_sq"] / n - (truth["sum"] / n) ** 2,
                                   rtol=1e-4, atol=1e-6)

        sketch = ask(url, token, AnalyticsRequest(computation="quantile_sketch", bins=16), wait_s=60)
        assert sketch["answer"]["histogram"] == true_answer(spec("quantile_sketch", bins=16), trains)["histogram"].tolist()

        # the global model on the devices' test splits, via each tier's forward graph on the device
        metrics = ask(url, token, AnalyticsRequest(computation="model_metrics", split="test"), wait_s=60)
        assert metrics["status"] == "answered", metrics
        confusion = np.array(metrics["answer"]["confusion"])
        assert confusion.sum() == sum(len(test) for _, test in splits)
        assert confusion.sum(axis=1).tolist() == true_answer(spec("label_histogram"), [t for _, t in splits])["counts"].tolist()
        assert 0 <= metrics["answer"]["accuracy"] <= 1 and metrics["answer"]["by_tier"]
        narrow = ask(url, token, AnalyticsRequest(computation="model_metrics", split="test", tier="b"), wait_s=60)
        assert list(narrow["answer"]["by_tier"]) == ["b"] and narrow["answer"]["count"] == confusion.sum()

        # with DP: noisy, charged to the books, epsilon shown
        noisy = ask(url, token, AnalyticsRequest(computation="label_histogram", dp_noise=2.0), wait_s=60)
        assert noisy["privacy"]["dp"] and 0 < noisy["privacy"]["epsilon"] < noisy["privacy"]["epsilon_total"] + 1e-9
        assert "diagnostics" not in noisy

        # too few devices: refused with the reason, nothing released
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        code = run(parser.parse_args(["sample_count", "--url", url, "--state-dir", str(state),
                                      "--min-devices", str(DEVICES + 1)]))
        assert code == EXIT_REFUSED
        document = json.loads(capsys.readouterr().out)
        assert document["status"] == "refused" and "min_devices" in document["reason"] and "answer" not in document

        # rounds went on meanwhile; the page's data shows the results; the report file holds them
        assert status()["round"] >= 1
        assert [r["computation"] for r in status()["analytics"]][-1] == "sample_count"
        assert len((state / "analytics.jsonl").read_text().splitlines()) == 7

        # secure aggregation: a fourth device shares its keys, then drops out; the three others' sum is unmasked
        dropping = DroppingDevice(mosquitto_url, fleet, "d3")
        try:
            _wait_for(lambda: any(d["device_id"] == "d3" for d in status()["devices"]), 30, "d3 to join")
            secure = ask(url, token, AnalyticsRequest(computation="label_histogram", secure=True, timeout_s=10),
                         wait_s=60)
        finally:
            dropping.stop()
        assert dropping.shared, "d3 shared its keys before it dropped out"
        assert secure["status"] == "answered" and secure["secure"] and secure["answered"] == DEVICES, secure
        assert secure["answer"]["counts"] == histogram["answer"]["counts"]
        assert "diagnostics" not in secure
        assert "(1 dropped after sharing keys: d3)" in log.read_text()
    finally:
        _stop(processes)
    # tierfl report's fleet diagnostics: skew from the plain label histogram, the rest from the aggregator's records
    page = render(load_run(state))
    for drawn in ("Quantity skew: samples per device", "Label skew", "Availability and answer rates per device",
                  "Training speed per tier", "model_metrics"):
        assert drawn in page, drawn
