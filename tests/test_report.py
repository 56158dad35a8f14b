"""`tierfl report`: a self-contained HTML page from a real engine's state directory, hostile strings escaped."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from aggregator import cli
from aggregator.engines.base import EngineConfig
from aggregator.engines.parts import EngineParts
from aggregator.engines.rounds import RoundEngine
from aggregator.registry import DeviceRegistry
from aggregator.report import load_run, render
from aggregator.store.artifacts import ArtifactStore
from aggregator.store.ledger import Ledger
from aggregator.store.state import StateRecord, StateStore, write_run_options
from aggregator.strategies.fedavg import FedAvg
from models.export import export_all
from models.spec import ModelSpec
from protocol.messages import RejectReason, RoundSummary, Update, new_id
from tierfl.cli import main

HOSTILE = "<script>alert(1)</script>"
SECTIONS = ("run", "configuration", "accuracy", "bytes", "participation", "rejections", "rounds")


def _engine_run(state: Path) -> None:
    """Two rounds of a real engine with a ledger; one refused frame carries a hostile detail and device id."""
    export_all(ModelSpec(arch="mlp", hidden=(4,)), ["a", "b"], state / "artifacts")
    registry = DeviceRegistry()
    for device in ("d1", "d2"):
        registry.hello(device, 10, 0, None, "ort-training", now=0.0)
    ledger = Ledger(state / "ledger.sqlite")
    engine = RoundEngine(EngineParts(EngineConfig(rounds=2), FedAvg(min_clients=2), ArtifactStore(state / "artifacts"),
                                     StateStore(state), registry, ledger=ledger))
    now = 1.0
    for round_number in (1, 2):
        tasks = engine.tick(now)
        for out in tasks:
            zeros = {n: np.zeros_like(v) for n, v in out.tensors.items()}
            body = Update(update_id=new_id(), round=round_number, base_version=engine.record.version, tier=out.body.tier,
                          num_samples=10, steps=1, train_loss=1.0, train_accuracy=0.5, train_seconds=0.1,
                          eval_loss=0.9, eval_accuracy=0.6, eval_samples=5)
            engine.on_update(out.device_id, new_id(), body, zeros, 100, now + 1)
        now += 10
    engine.count_rejection(RejectReason.MALFORMED, HOSTILE, "d<b>9")
    ledger.close()
    assert engine.record.round == 2


def _check_page(page: str) -> None:
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("<svg") == 4  # accuracy, loss, bytes, participation
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "src=" not in page


def test_report_of_a_real_engine_run_escapes_what_came_from_the_network(tmp_path):
    state = tmp_path / "state"
    _engine_run(state)
    assert main(["report", str(state)]) == 0
    page = (state / "report.html").read_text()
    _check_page(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "d&lt;b&gt;9" in page
    assert "malformed" in page and "Last 1 refused messages" in page
    assert re.search(r"<th>tier</th>.*<td>b</td><td>0\.5</td>", page)  # tiers from STATE/artifacts/index.json
    for label, value in (("model", "mlp8-h4"), ("input", "1 x 8 x 8"), ("classes", "10"), ("batch norm", "no"),
                         ("origin", "TierFL model zoo"), ("architecture", "mlp"), ("hidden widths", "4")):
        assert f"<tr><th>{label}</th><td>{value}</td></tr>" in page, label  # the export's card and its recipe
    assert "source sha256" not in page
    macs = {t: a.manifest.macs for t, a in ArtifactStore(state / "artifacts").tiers.items()}
    assert re.search(rf"<th>MACs per sample</th>.*<td>a</td><td>1</td><td>[0-9,]+</td><td>{macs['a']:,}</td>", page)
    assert "federated" in page  # accuracy from the devices' evaluation


def test_report_lists_the_options_of_the_latest_start_with_the_password_masked(tmp_path):
    state = tmp_path / "state"
    _engine_run(state)
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args(["--strategy", "fedprox", "--lr", "0.05", "--epochs", "3", "--rounds", "2",
                              "--broker", "mqtt://aggregator:hunter2@broker.lan:1883", "--state-dir", str(state)])
    write_run_options(state, cli.run_options(args))
    assert main(["report", str(state)]) == 0
    page = (state / "report.html").read_text()
    for option, value in (("--strategy", "fedprox"), ("--lr", "0.05"), ("--epochs", "3"), ("--rounds", "2"),
                          ("--broker", "mqtt://aggregator:***@broker.lan:1883")):
        assert f"<tr><th>{option}</th><td>{value}</td></tr>" in page, option
    assert "hunter2" not in page and "hunter2" not in (state / "options.json").read_text()


def test_report_without_ledger_or_artifacts_uses_the_round_summaries(tmp_path):
    state = tmp_path / "state"
    history = [
        RoundSummary(round=1, version=1, selected=3, answered=3, accuracy=0.5, loss=1.5, accuracy_source="held-out",
                     accuracy_by_tier={"a": 0.5, HOSTILE: 0.4}, bytes_up=1000, bytes_down=5000, seconds=2.0,
                     rejected={"late": 1}),
        RoundSummary(round=2, version=1, selected=3, answered=1, accuracy=None, loss=None, rejected={"late": 3}),
        RoundSummary(round=3, version=2, selected=3, answered=2, accuracy=0.8, loss=0.7, accuracy_source="held-out",
                     accuracy_by_tier={"a": 0.8}, bytes_up=900, bytes_down=800, seconds=1.0,
                     rejected={"duplicate": 2}, final=True),  # the aggregator restarted: counters start again
    ]
    StateStore(state).commit(StateRecord(fleet="f", model=f"m{HOSTILE}", version=2, round=3, history=history), None)
    page = render(load_run(state))
    _check_page(page)
    assert HOSTILE not in page and "m&lt;script&gt;" in page
    assert "<td>late</td><td>3</td>" in page and "<td>duplicate</td><td>2</td>" in page
    assert "Failed rounds (too few updates, no new version): 2." in page
    assert "no export index" in page and "no ledger" in page


def test_an_export_of_the_older_format_is_a_note_naming_the_way_out(tmp_path):
    state = tmp_path / "state"
    _engine_run(state)
    index = state / "artifacts" / "index.json"
    index.write_text(index.read_text().replace('"format_version": 2', '"format_version": 1'))
    page = render(load_run(state))
    assert "exported by an older TierFL" in page and f"re-run tierfl export --out {state / 'artifacts'}" in page
    assert "<h3>Tiers</h3>" not in page


def test_missing_foreign_or_corrupt_state_directories_are_one_line_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "has no state.json" in capsys.readouterr().err
    (tmp_path / "state.json").write_text('{"fleet": "f", "model": ')
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is corrupt or not a TierFL state file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


def test_unreadable_fleet_record_and_analytics_results_are_notes_naming_the_file(tmp_path):
    state = tmp_path / "state"
    StateStore(state).commit(StateRecord(fleet="f", model="m", version=0, round=0, history=[]), None)
    (state / "fleet.json").write_text("{not json")
    (state / "analytics.jsonl").write_text('{"status": "answered", "diagnostics": {"samples_per_device": 5}}\n')
    page = render(load_run(state))
    assert "fleet.json does not read" in page and "(or delete it)" in page
    assert "analytics.jsonl holds a line that is not an analytics result" in page and "move the file aside" in page
