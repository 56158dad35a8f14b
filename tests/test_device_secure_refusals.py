"""Issue 13 leftovers on the device's secure side: a secure task whose settings fail the device's checks is refused
when it is handed in (never queued, never trained), and every refusal of the secure client is counted in the agent's
`refused` through its throttled refusal path, like any other device refusal.

The agent is real (real cache, real ONNX Runtime on an exported 8x8 MLP tier), driven as in test_device_hostile.
"""

from __future__ import annotations

import logging

from protocol.frame import decode_frame
from protocol.messages import Fetch, SecAgg, SecureAggregation, Update, new_id
from protocol.secagg.wire import wrap
from tests.test_device_hostile import Aggregator, data, exported, make_agent, run, working  # noqa: F401


def _secure(aggregator: Aggregator, **changes) -> SecureAggregation:
    shapes = {name: list(shape) for name, shape in aggregator.tier.shapes.items()}
    fields = dict(session=new_id(), threshold=2, max_devices=3, ring_bits=32, frac_bits=16, clip=1.0, weight=1.0,
                  shapes=shapes, block=shapes)
    return SecureAggregation(**(fields | changes))


def test_a_secure_task_whose_settings_fail_is_refused_and_never_trained(tmp_path, exported, data, caplog):
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    name, shape = next(iter(aggregator.tier.shapes.items()))
    bad = [_secure(aggregator, threshold=5, max_devices=3),  # more shares needed than devices
           _secure(aggregator, frac_bits=52, ring_bits=32),  # the sum would wrap the ring
           _secure(aggregator, block={**_secure(aggregator).block, name: [s + 1 for s in shape]})]  # block too big
    with caplog.at_level(logging.WARNING), working(agent):
        for round_number, settings in enumerate(bad, 1):
            run(agent, aggregator.frame(aggregator.task(round_number, secure=settings), aggregator.weights()))
    assert agent.refused == {"malformed": 3}
    assert agent.tasks_done == 0 and link.bodies(SecAgg) == [] and link.bodies(Update) == []
    assert link.bodies(Fetch) == []  # not even its files were fetched
    assert "trained, but its secure session is gone" not in caplog.text
    assert "refusing the secure task: round 1: its secure-aggregation settings fail" in caplog.text


def test_a_good_secure_task_is_taken_and_its_keys_advertised(tmp_path, exported, data):
    """The check refuses only what fails: sound settings still open a session."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, link = make_agent(tmp_path, aggregator, data)
    agent._handle(decode_frame(aggregator.frame(aggregator.task(1, secure=_secure(aggregator)), aggregator.weights())))
    assert agent.refused == {} and len(agent._tasks) == 1
    assert [body.phase for body in link.bodies(SecAgg)] == ["advertise"]


def test_secure_client_refusals_are_counted_and_throttled(tmp_path, exported, data, caplog):
    """A step the protocol does not allow and a payload that does not parse: counted, logged once per reason."""
    aggregator = Aggregator(tmp_path / "agg", exported)
    agent, _ = make_agent(tmp_path, aggregator, data)
    settings = _secure(aggregator)
    assert agent.secure is not None and agent.secure.on_task(aggregator.task(1, secure=settings))
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            agent.secure.on_message(SecAgg(round=1, session=settings.session, phase="roster", payload="{}"))
            assert agent.secure.on_task(aggregator.task(1, secure=settings))  # a session again for the next one
        for _ in range(5):
            agent.secure.on_message(SecAgg(round=1, session=settings.session, phase="advertise",
                                           payload=_advert_payload(agent, settings)))
            assert agent.secure.on_task(aggregator.task(1, secure=settings))
        assert not agent.secure.on_task(aggregator.task(1, secure=_secure(aggregator, threshold=4)))
    assert agent.refused == {"malformed": 6, "unexpected": 5}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a message")]
    assert len(lines) == 2  # one line per sender and reason per interval
    assert "secure aggregation message refused, leaving the round" in lines[0]
    assert "secure aggregation step refused, leaving the round" in lines[1]


def _advert_payload(agent, settings: SecureAggregation) -> str:
    """A well-formed advertisement: a message the aggregator never sends a device (an out-of-protocol step)."""
    session = agent.secure._session
    body, _ = wrap(session.device._mine, settings.session)
    return body.payload
