"""Federated analytics in-process: the menu against numpy on the raw data, the desk's checks of hostile answers
and its minimum-devices rule, DP noise within its stated bound and charged to dp-accounting's books, and the
status server's POST /analytics (token, size, schema). The fleet over Mosquitto: test_analytics_integration."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest

from aggregator.analytics import BOOKS_FILE, RESULTS_FILE, AnalyticsDesk, AnalyticsRequest, analytics_token
from aggregator.fleet_record import FleetRecord, read_fleet
from aggregator.monitor import Monitor
from aggregator.registry import DeviceRegistry
from edge_client.secure_client import secure_params
from models.analytics import QuerySpec, compute, finish, gaussian_bound, score, true_answer
from models.data import Dataset
from protocol.frame import FrameError
from protocol.messages import Answer, Query, Reject, RejectReason
from protocol.secagg.device import SecAggDevice
from protocol.secagg.wire import unwrap, wrap
from tierfl.cli import main as tierfl_main

SHAPE, CLASSES = (2, 3, 3), 4  # two channels of 9 values


def _data(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.uniform(-0.5, 1.5, (n, *SHAPE)).astype(np.float32), rng.integers(0, CLASSES, n).astype(np.int64))


def test_menu_matches_numpy_and_merges_by_addition():
    shards = [_data(50, 1), _data(70, 2)]
    whole = Dataset(np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards]))
    clipped = np.clip(whole.x, 0, 1).transpose(1, 0, 2, 3).reshape(2, -1)  # per channel, all values
    for computation in ("label_histogram", "sample_count", "feature_moments", "quantile_sketch"):
        spec = QuerySpec(computation, SHAPE, CLASSES, bins=20)
        merged = true_answer(spec, shards)
        for name, value in compute(spec, whole).items():
            np.testing.assert_allclose(merged[name], value, rtol=1e-6)
        assert spec.problem(compute(spec, shards[0]), len(shards[0])) is None
    moments = finish(QuerySpec("feature_moments", SHAPE, CLASSES), true_answer(QuerySpec("feature_moments", SHAPE,
                                                                                          CLASSES), shards))
    np.testing.assert_allclose(moments["mean"], clipped.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(moments["variance"], clipped.var(axis=1), rtol=1e-4)
    sketch = QuerySpec("quantile_sketch", SHAPE, CLASSES, bins=20)
    read = finish(sketch, true_answer(sketch, shards))
    assert read["quantile_error"] == pytest.approx(1 / 20)
    for q in (10, 50, 90):  # the stated error: one bin width
        assert np.abs(np.array(read["quantiles"][f"p{q}"]) - np.quantile(clipped, q / 100, axis=1)).max() <= 1 / 20


def test_model_metrics_from_logits():
    spec = QuerySpec("model_metrics", SHAPE, 3, loss_clip=5.0)
    logits = np.array([[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [100, 0, -100]])
    labels = np.array([0, 1, 1, 2])
    answer = score(spec, logits, labels)
    assert spec.problem(answer, 4) is None
    result = finish(spec, answer)
    assert result["accuracy"] == 0.5 and np.array(result["confusion"]).sum() == 4
    assert answer["loss_sum"][0] <= 4 * 5.0 and np.isclose(answer["loss_sum"][0], 5.0 + 5.0 + 2 * 2.5e-4, atol=1e-4)  # two clipped


class Fleet:
    """A desk over three registered devices (d0..d2, 30 train samples each) and a card of SHAPE and CLASSES."""

    def __init__(self, tmp_path, seed: int = 0) -> None:
        self.registry = DeviceRegistry()
        for i in range(3):
            self.registry.hello(f"d{i}", 30, 10, None, "portable", now=0.0)
        self.counted: list[tuple[RejectReason, str | None]] = []
        artifacts = SimpleNamespace(card=SimpleNamespace(input_shape=list(SHAPE), num_classes=CLASSES), tiers={})
        self.desk = AnalyticsDesk(self.registry, artifacts, lambda tier: (0, {}),  # type: ignore[arg-type]
                                  lambda reason, detail, device: self.counted.append((reason, device)),
                                  folder=tmp_path, seed=seed)
        self.data = {f"d{i}": _data(30, 10 + i) for i in range(3)}

    def start(self, **request) -> tuple[str, Query]:
        query_id = self.desk.submit(AnalyticsRequest(**request), now=1.0)
        sent = self.desk.tick(1.0)
        assert sorted(m.device_id for m in sent) == ["d0", "d1", "d2"]
        return query_id, sent[0].body

    def answer(self, device: str, query: Query, tensors=None, samples: int = 30, query_id: str | None = None):
        body = Answer(query=query_id or query.query, num_samples=samples)
        if tensors is None:
            tensors = compute(QuerySpec(query.computation, SHAPE, CLASSES), self.data[device])
        try:
            self.desk.expected_tensors(device, body, 2.0)
        except FrameError as exc:
            return exc.reason
        out = self.desk.on_answer(device, "m" * 32, body, tensors, 2.0)
        return out[0].body.reason if out and isinstance(out[0].body, Reject) else None


def test_hostile_answers_are_refused_counted_and_never_summed(tmp_path):
    fleet = Fleet(tmp_path)
    query_id, query = fleet.start(computation="label_histogram")
    good = compute(QuerySpec("label_histogram", SHAPE, CLASSES), fleet.data["d1"])
    assert fleet.answer("d0", query) is None
    hostile = {
        "nan": ({"counts": np.full(CLASSES, np.nan, np.float32)}, 30, RejectReason.NON_FINITE),
        "not adding up": ({"counts": good["counts"] + 1}, 30, RejectReason.BAD_TENSOR),
        "negative": ({"counts": good["counts"] * np.array([-1, 1, 1, 1], np.float32)}, 30, RejectReason.BAD_TENSOR),
        "fractions": ({"counts": good["counts"] / 2}, 15, RejectReason.BAD_TENSOR),
        "wrong tensor": ({"hist": good["counts"]}, 30, RejectReason.BAD_TENSOR),
        "more samples than announced": ({"counts": good["counts"] * 2}, 60, RejectReason.TOO_MANY_SAMPLES),
    }
    for name, (tensors, samples, reason) in hostile.items():
        assert fleet.answer("d1", query, tensors, samples) is reason, name
    assert fleet.answer("d0", query) is RejectReason.DUPLICATE
    assert fleet.answer("d1", query, query_id="f" * 32) is RejectReason.STALE_ROUND
    fleet.registry.hello("outsider", 30, 10, None, "portable", now=0.0)
    assert fleet.answer("outsider", query, good) is RejectReason.NOT_SELECTED
    assert fleet.answer("d1", query) is None and fleet.answer("d2", query) is None
    fleet.desk.tick(3.0)
    result = fleet.desk.result(query_id)
    assert result["status"] == "answered" and result["answered"] == 3 and result["samples"] == 90
    assert result["answer"]["counts"] == true_answer(QuerySpec("label_histogram", SHAPE, CLASSES),
                                                     list(fleet.data.values()))["counts"].tolist()
    assert sum(result["refused_answers"].values()) == 9
    # refused after decoding: counted where the engine counts refusals (before decoding, FrameError: the service's)
    assert len([c for c in fleet.counted if c[1] == "d1"]) == 5
    assert json.loads((tmp_path / RESULTS_FILE).read_text().splitlines()[-1])["id"] == query_id


def test_too_few_devices_release_nothing(tmp_path):
    fleet = Fleet(tmp_path)
    query_id, query = fleet.start(computation="sample_count", min_devices=3)
    assert fleet.answer("d0", query) is None and fleet.answer("d1", query) is None
    fleet.desk.tick(100.0)  # the deadline passed with two answers
    result = fleet.desk.result(query_id)
    assert result["status"] == "refused" and "answer" not in result and "fewer than the 3" in result["reason"]
    assert result["samples"] is None  # not even the two answers' total: it is what was refused
    query_id, query = fleet.start(computation="sample_count")  # three answers, one of them of no data
    empty = {"count": np.zeros(1, np.float32)}
    assert fleet.answer("d0", query) is None and fleet.answer("d1", query) is None
    assert fleet.answer("d2", query, empty, samples=0) is None
    fleet.desk.tick(3.0)
    assert "only 2 of 3 devices answered with data" in fleet.desk.result(query_id)["reason"]
    fleet.registry.hello("d3", 30, 10, None, "portable", now=0.0)
    drawn = fleet.desk.submit(AnalyticsRequest(computation="sample_count", max_devices=3), now=3.0)
    assert len(fleet.desk.tick(3.0)) == 3 and fleet.desk.result(drawn)["asked"] == 3  # 3 of the 4 online
    fleet.desk.tick(100.0)
    fleet.registry.set_online("d3", False, 100.0)
    asked_too_many = fleet.desk.submit(AnalyticsRequest(computation="sample_count", min_devices=4), now=101.0)
    fleet.desk.tick(101.0)
    assert "only 3 devices are online" in fleet.desk.result(asked_too_many)["reason"]
    assert fleet.desk.submit(AnalyticsRequest(computation="sample_count", min_devices=1), 102.0)
    fleet.desk.tick(102.0)
    assert fleet.desk.open is not None and fleet.desk.open.request.min_devices == 1
    assert fleet.desk.result(fleet.desk.open.id)["min_devices"] == 3  # the floor holds
    fleet.desk.tick(200.0)
    query_id, query = fleet.start(computation="label_histogram", dp_noise=1.0)  # refused: nothing charged
    assert fleet.answer("d0", query) is None
    fleet.desk.tick(300.0)
    assert fleet.desk.result(query_id)["status"] == "refused" and not fleet.desk.books.events


def test_dp_noise_stays_within_the_stated_bound_and_is_charged(tmp_path):
    fleet = Fleet(tmp_path, seed=7)
    truth = true_answer(QuerySpec("label_histogram", SHAPE, CLASSES), list(fleet.data.values()))["counts"]
    within, epsilons = 0, []
    trials = 40
    for _ in range(trials):
        query_id, query = fleet.start(computation="label_histogram", dp_noise=1.5)
        for device in fleet.data:
            assert fleet.answer(device, query) is None
        fleet.desk.tick(3.0)
        result = fleet.desk.result(query_id)
        privacy = result["privacy"]
        error = np.abs(np.array(result["answer"]["counts"]) - truth).max()
        within += error <= privacy["error_bound"]
        epsilons.append(privacy["epsilon_total"])
        assert "diagnostics" not in result and result["samples"] is None  # nothing exact beside a noisy answer
    assert privacy["std"] == 1.5 and privacy["error_bound"] == pytest.approx(gaussian_bound(1.5, CLASSES))
    assert within >= 0.9 * trials  # 95 % for all elements at once, by construction
    single = dp_accounting.rdp.RdpAccountant()
    single.compose(dp_accounting.GaussianDpEvent(1.5))
    assert privacy["epsilon"] == pytest.approx(single.get_epsilon(1e-5))
    assert epsilons == sorted(epsilons) and epsilons[-1] > epsilons[0]
    again = Fleet(tmp_path)  # the books survive a restart
    assert len(again.desk.books.events) == trials
    assert json.loads((tmp_path / BOOKS_FILE).read_text())["unit"] == "one sample"


@pytest.mark.parametrize("text", ["{not json", '{"events": [[0, 1, 1]]}', '{"events": 5}', "[]"])
def test_unreadable_books_stop_the_desk_naming_the_file(tmp_path, text):
    (tmp_path / BOOKS_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"{BOOKS_FILE} does not read.*move it aside"):
        Fleet(tmp_path)


def test_status_server_takes_queries_with_the_token_only():
    with Monitor(analytics_token="t" * 32) as monitor:
        url = f"{monitor.url}analytics"

        def post(body: bytes, token: str | None = "t" * 32) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body, headers, method="POST"), timeout=5) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        good = AnalyticsRequest(computation="label_histogram").model_dump_json().encode()
        assert post(good, token=None) == 401 and post(good, token="u" * 32) == 401
        assert post(b'{"computation": "raw_samples"}') == 400
        assert post(b'{"computation": "label_histogram", "min_devices": -1}') == 400
        assert post(b" " * 5000) == 413
        assert monitor.take_queries() == []
        assert post(good) == 202
        taken = monitor.take_queries()
        assert [request.computation for _, request in taken] == ["label_histogram"]
        with urllib.request.urlopen(f"{url}/{taken[0][0]}", timeout=5) as response:
            assert json.loads(response.read())["status"] == "posted"


def test_the_fleet_record_counts_availability_and_answers_and_keeps_a_bounded_file(tmp_path, monkeypatch):
    registry = DeviceRegistry()
    for i in range(3):
        registry.hello(f"d{i}", 30, 10, None, "portable", now=0.0)
    record = FleetRecord(registry, tmp_path)
    record.sample(0.0)
    registry.set_online("d2", False, 1.0)
    record.sample(1.0)  # within SAMPLE_S: not taken
    record.sample(1.0, force=True)
    record.query(["d0", "d1", "d2"], ["d0", "d1"])
    record.sample(10.0)
    rows = read_fleet(tmp_path).devices
    assert [(rows[d].online_samples, rows[d].seen_samples) for d in ("d0", "d2")] == [(3, 3), (1, 3)]
    assert (rows["d1"].queries_answered, rows["d2"].queries_asked, rows["d2"].queries_answered) == (1, 1, 0)
    assert FleetRecord(registry, tmp_path).file.devices["d2"].seen_samples == 3  # a restart goes on counting
    monkeypatch.setattr("aggregator.fleet_record.MAX_KEPT", 2)
    record.file.devices["gone"] = record.file.devices["d0"].model_copy()  # a device the registry forgot
    record.sample(20.0)
    assert sorted(read_fleet(tmp_path).devices) == ["d0", "d1"]


def test_tierfl_analytics_names_the_option_of_a_bad_request_and_exits_2(capsys):
    for options, message in ((["--low", "2", "--high", "1"], "low 2.0 must be below high 1.0"),
                             (["--timeout", "0"], "--timeout: Input should be greater than 0"),
                             (["--min-devices", "0"], "--min-devices: Input should be greater than or equal to 1"),
                             (["--max-devices", "2"], "max_devices 2 asks fewer devices than the 3 an answer needs "
                                                      "(min_devices, at least 3)")):
        assert tierfl_main(["analytics", "sample_count", "--url", "http://127.0.0.1:9", *options]) == 2
        assert capsys.readouterr().err.strip() == f"tierfl analytics: error: {message}"


@pytest.mark.parametrize("min_devices", [3, 4])
def test_a_secure_query_sums_masked_answers_and_refuses_the_hostile_ones(tmp_path, min_devices):
    fleet = Fleet(tmp_path)
    fleet.registry.hello("d3", 30, 10, None, "portable", now=0.0)
    fleet.data["d3"] = _data(30, 13)
    query_id = fleet.desk.submit(AnalyticsRequest(computation="label_histogram", secure=True, min_devices=min_devices),
                                 now=1.0)
    queries = {m.device_id: m.body for m in fleet.desk.tick(1.0)}
    devices = {d: SecAggDevice(d, secure_params(q), q.secure.block, session=q.secure.session) for d, q in queries.items()}
    session = queries["d0"].secure.session
    assert fleet.desk.owns(session) and not fleet.desk.owns("0" * 32)

    def send(device: str, message, now: float = 2.0):
        body, tensors = wrap(message, session)
        try:
            fleet.desk.masked_tensors(device, body, now)
        except FrameError as exc:
            return exc.reason
        out = fleet.desk.on_secagg(device, "m" * 32, body, tensors or {}, now)
        return out[0].body.reason if out else None

    adverts = {d: device.advertise() for d, device in devices.items()}
    assert all(send(d, advert) is None for d, advert in adverts.items())
    assert send("d0", adverts["d0"]) is RejectReason.DUPLICATE
    rosters = {m.device_id: unwrap(m.body, {}) for m in fleet.desk.tick(2.0)}
    assert sorted(rosters) == ["d0", "d1", "d2", "d3"]
    assert all(send(d, devices[d].share_keys(rosters[d])) is None for d in devices)
    deliveries = {m.device_id: unwrap(m.body, {}) for m in fleet.desk.tick(2.0)}
    answers = {d: compute(QuerySpec("label_histogram", SHAPE, CLASSES), fleet.data[d]) for d in devices}
    masked = {d: devices[d].mask(deliveries[d], answers[d], 1.0) for d in ("d0", "d1", "d2")}  # d3 drops out
    assert send("d0", masked["d0"].model_copy(update={"weight": 2.0})) is RejectReason.BAD_TENSOR  # each weighs 1
    for d in masked:
        assert send(d, masked[d]) is None
    assert send("d1", adverts["d1"]) is RejectReason.LATE  # its phase closed
    requests = {m.device_id: unwrap(m.body, {}) for m in fleet.desk.tick(100.0)}  # the masked-input deadline passed
    if min_devices == 4:  # the threshold is at least min_devices: three masked answers are never unmasked
        result = fleet.desk.result(query_id)
        assert not requests and result["status"] == "refused" and "answer" not in result
        assert "only 3 devices sent masked inputs, below the threshold 4" in result["reason"]
        return
    assert sorted(requests) == ["d0", "d1", "d2"]
    assert all(send(d, devices[d].unmask(requests[d]), now=100.0) is None for d in requests)
    fleet.desk.tick(100.0)
    result = fleet.desk.result(query_id)
    assert result["status"] == "answered" and result["secure"] and result["answered"] == 3
    truth = true_answer(QuerySpec("label_histogram", SHAPE, CLASSES), [fleet.data[d] for d in ("d0", "d1", "d2")])
    assert result["answer"]["counts"] == truth["counts"].tolist()
    assert result["refused_answers"] == {"duplicate": 1, "bad_tensor": 1, "late": 1}
    assert "diagnostics" not in result


def test_a_token_file_that_is_not_ascii_names_itself(tmp_path):
    (tmp_path / "analytics.token").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="analytics.token holds no token.*delete it"):
        analytics_token(tmp_path)
