"""`tierfl report`: one self-contained HTML page about a run, read from its state directory.

Everything comes from what the aggregator left on disk: state.json (identity and the round
history), ledger.sqlite (every update accepted or refused, if present) and the artifacts index
(the model and its tiers, if the export is there). Charts are inline SVG (aggregator.report_html), so
the page needs no network, no script and no plotting library. Every string read from the state is
escaped: device ids and refusal details come from the network.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from aggregator.engines.personal import WORST_FRACTION
from aggregator.report_fleet import section_fleet
from aggregator.report_html import Series, esc, num, svg_chart, table
from aggregator.store.state import RunOptions, StateRecord, read_run_options
from models.manifest import ModelCard
from protocol.atomic_file import atomic_write
from protocol.messages import RoundSummary

if TYPE_CHECKING:  # read only when an export is there (it imports onnx)
    from aggregator.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)
MAX_DEVICES = 200  # rows of the per-device table
# The options the report shows, in this order (the rest stay in options.json).
RUN_OPTIONS = ("strategy", "rounds", "fraction", "min_clients", "min_updates", "epochs", "batch_size", "lr",
               "round_timeout", "sampling", "tiers", "tier_policy", "tier_mix", "aggregation", "mu", "robust",
               "trim_fraction", "clip_norm", "dp", "dp_clip", "dp_noise", "secure_aggregation", "downlink",
               "bn_statistics", "outlier_multiple", "max_share", "buffer_size", "max_staleness", "fleet", "broker",
               "enrolled", "eval_data", "personal_layers", "seed")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `tierfl report` options to `parser`."""
    parser.description = (
        "Write a self-contained HTML report of a run from its aggregator state directory: identity, model and "
        "tiers, accuracy and loss per round (global and per tier), bytes up and down, participation, and "
        "rejections from the ledger. No network access is needed to view it."
    )
    parser.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the aggregator's --state-dir")
    parser.add_argument("--out", type=Path, help="HTML file to write (default: STATE_DIR/report.html)")
    parser.add_argument("--artifacts", type=Path, help="export folder the aggregator used, for the model and tiers "
                        "(default: STATE_DIR/artifacts)")
    parser.add_argument("--last", type=int, default=50, help="refused messages to list, newest first (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Write the report; 0 on success."""
    out = args.out or args.state_dir / "report.html"
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: {out.parent} is not a directory")
    page = render(load_run(args.state_dir, args.artifacts, args.last))
    atomic_write(out, lambda f: f.write(page.encode()))
    print(f"tierfl report: wrote {out} ({len(page.encode()) / 1024:.1f} kB)")
    return 0


# -- reading the state directory ---------------------------------------------------------------


@dataclass
class LedgerSummary:
    """What the report shows of ledger.sqlite."""

    first_at: float | None = None
    last_at: float | None = None
    decisions: dict[tuple[str, bool], int] = field(default_factory=dict)  # (kind, accepted) -> count
    by_reason: dict[str, int] = field(default_factory=dict)
    refused: list[tuple] = field(default_factory=list)  # (at, round, device, kind, reason, detail), newest first
    devices: list[tuple] = field(default_factory=list)  # (device, accepted updates, refused, bytes, last at)


@dataclass
class RunData:
    """Everything read from a state directory."""

    state_dir: Path
    record: StateRecord
    ledger: LedgerSummary | None
    ledger_note: str
    artifacts: ArtifactStore | None
    artifacts_note: str
    options: RunOptions | None = None  # the latest start's options (options.json), if recorded


def load_run(state_dir: Path, artifacts_dir: Path | None = None, last: int = 50) -> RunData:
    """Read a state directory; ValueError with one clear line if it is not one."""
    if not state_dir.is_dir():
        raise ValueError(f"{state_dir} is not a directory (give the aggregator's --state-dir)")
    path = state_dir / "state.json"
    if not path.is_file():
        raise ValueError(f"{state_dir} has no state.json: not an aggregator state directory, or no round finished yet")
    try:
        record = StateRecord.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise ValueError(f"{path} is corrupt or not a TierFL state file ({where}: {first['msg']}"
                         + (f"; {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ")")) from None
    ledger, ledger_note = _read_ledger(state_dir / "ledger.sqlite", last)
    artifacts, artifacts_note = _read_artifacts(artifacts_dir or state_dir / "artifacts", record.model)
    return RunData(state_dir, record, ledger, ledger_note, artifacts, artifacts_note, read_run_options(state_dir))


def _read_ledger(path: Path, last: int) -> tuple[LedgerSummary | None, str]:
    if not path.is_file():
        return None, f"no ledger at {path} (written by aggregators since the round ledger was added)"
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            summary = LedgerSummary()
            summary.first_at, summary.last_at = db.execute("SELECT MIN(at), MAX(at) FROM received").fetchone()
            summary.decisions = {(kind, bool(ok)): n for kind, ok, n in
                                 db.execute("SELECT kind, accepted, COUNT(*) FROM received GROUP BY 1, 2")}
            summary.by_reason = dict(db.execute("SELECT reason, COUNT(*) FROM received WHERE accepted = 0 "
                                                "GROUP BY 1 ORDER BY 2 DESC, 1"))
            summary.refused = db.execute("SELECT at, round, device, kind, reason, detail FROM received WHERE accepted = 0 "
                                         "ORDER BY id DESC LIMIT ?", (max(last, 0),)).fetchall()
            summary.devices = db.execute(
                "SELECT device, SUM(accepted AND kind = 'update'), SUM(1 - accepted), SUM(bytes), MAX(at) FROM received "
                "WHERE device IS NOT NULL GROUP BY device ORDER BY device LIMIT ?", (MAX_DEVICES + 1,)).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None, f"the ledger {path} could not be read: {exc}"
    return summary, ""


def _read_artifacts(folder: Path, identity: str) -> tuple[ArtifactStore | None, str]:
    """The export at `folder` and a note for the page (why it is missing, unreadable or another run's)."""
    from aggregator.store.artifacts import ArtifactStore

    if not (folder / "index.json").is_file():
        return None, (f"no export index at {folder / 'index.json'}: the aggregator ran with --artifacts elsewhere "
                      "(pass that folder as --artifacts to show the model and its tiers)")
    try:
        store = ArtifactStore(folder)
    except (OSError, ValueError) as exc:
        return None, f"the export at {folder} could not be read: {str(exc).splitlines()[0]}"
    if store.identity != identity:
        return store, f"the export at {folder} is model {store.identity}, not this run's {identity}"
    return store, ""


# -- rendering ---------------------------------------------------------------------------------


def _date(at: float | None) -> str:
    if at is None:
        return "n/a"
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _pairs(rows: list[tuple[str, str]]) -> str:
    """A two-column key/value table; values must already be escaped."""
    return '<table class="kv">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _committed(history: list[RoundSummary]) -> list[bool]:
    """Whether each round committed a new version (a failed round keeps the previous one)."""
    flags, previous = [], 0
    for s in history:
        flags.append(s.version > previous)
        previous = max(previous, s.version)
    return flags


def _rejected_totals(history: list[RoundSummary]) -> dict[str, int]:
    """Rejections by reason over the run from the summaries' counters, which restart with the aggregator."""
    totals: collections.Counter[str] = collections.Counter()
    previous: dict[str, int] = {}
    for s in history:
        restarted = any(s.rejected.get(r, 0) < n for r, n in previous.items())
        for reason, n in s.rejected.items():
            totals[reason] += n if restarted else n - previous.get(reason, 0)
        previous = s.rejected
    return dict(totals.most_common())


def _section_run(data: RunData) -> str:
    record, history = data.record, data.record.history
    last = history[-1] if history else None
    finished = "finished (last round reached)" if last and last.final else "not finished (the last round was not reached)"
    by_tier = ", ".join(f"tier {esc(t)} {a:.4f}" for t, a in sorted(last.accuracy_by_tier.items())) if last else ""
    rows = [
        ("fleet", esc(record.fleet)),
        ("model", esc(record.model)),
        ("version", esc(record.version)),
        ("rounds done", f"{esc(record.round)} ({sum(_committed(history))} committed, "
                        f"{len(history) - sum(_committed(history))} failed); {finished}"),
        ("final accuracy", f"{num(last.accuracy)} ({esc(last.accuracy_source)})" + (f"; {by_tier}" if by_tier else "")
         if last else "n/a"),
        ("final loss", num(last.loss) if last else "n/a"),
        ("bytes", f"{_bytes(sum(s.bytes_up for s in history))} up, {_bytes(sum(s.bytes_down for s in history))} down"),
        ("round time", f"{sum(s.seconds for s in history):.1f} s over {len(history)} rounds"),
    ]
    if data.ledger:
        rows += [("first decision", esc(_date(data.ledger.first_at))), ("last decision", esc(_date(data.ledger.last_at)))]
    rows.append(("state directory", esc(data.state_dir.resolve())))
    return '<section id="run"><h2>Run</h2>' + _pairs(rows) + "</section>"


def _macs(macs: int) -> str:
    """Multiply-accumulates in M or G (n/a when the manifest records none)."""
    if not macs:
        return "n/a"
    return f"{macs / 1e9:.2f} G" if macs >= 1e9 else f"{macs / 1e6:.2f} M" if macs >= 1e6 else f"{macs:,}"


def _model_rows(card: ModelCard) -> list[tuple[str, str]]:
    """The model card as (label, HTML) rows: what was exported, and its recipe or its source file's sha256."""
    rows = [("model", esc(card.name)), ("input", esc(" x ".join(map(str, card.input_shape)))),
            ("classes", esc(card.num_classes)), ("batch norm", "yes" if card.batch_norm else "no")]
    if card.recipe is not None:
        recipe = card.recipe
        rows += [("origin", "TierFL model zoo"), ("architecture", esc(recipe.arch)),
                 ("hidden widths", esc(", ".join(map(str, recipe.widths)))), ("init seed", esc(recipe.seed))]
    else:
        rows += [("origin", "ONNX file"), ("source sha256", f"<code>{esc(card.source_sha256 or 'n/a')}</code>")]
    return rows


def _section_configuration(data: RunData) -> str:
    body = f'<p class="note">{esc(data.artifacts_note)}</p>' if data.artifacts_note else ""
    store = data.artifacts
    if store is not None:
        body += _pairs(_model_rows(store.card) + [("export identity", esc(store.identity))])
        rows = [[esc(tier), f"{t.manifest.rate:g}", f"{t.manifest.param_count:,}", esc(_macs(t.manifest.macs)),
                 esc(_bytes(t.manifest.artifact_bytes)), esc(t.manifest.optimizer),
                 ", ".join(n for n, on in (("scaler", t.manifest.scaler), ("class mask", t.manifest.class_mask),
                                           ("FedProx", t.manifest.proximal)) if on) or "-"]
                for tier, t in sorted(store.tiers.items())]
        head = ["tier", "width rate", "parameters", "MACs per sample", "artifacts", "optimizer", "graph inputs"]
        body += "<h3>Tiers</h3>" + table(head, rows)
    if data.options is not None:
        recorded = data.options.options
        rows = [(f"--{name.replace('_', '-')}", esc(recorded[name])) for name in RUN_OPTIONS
                if recorded.get(name) not in (None, False)]
        body += f"<h3>Options of the latest start ({esc(_date(data.options.started))})</h3>" + _pairs(rows)
    else:
        body += '<p class="note">no options.json: the options are recorded by aggregators since the report showed them</p>'
    return '<section id="configuration"><h2>Configuration</h2>' + body + "</section>"


def _section_curves(history: list[RoundSummary]) -> str:
    rounds = [s.round for s in history]
    tiers = sorted({t for s in history for t in s.accuracy_by_tier})
    accuracy = [Series("global", [s.accuracy for s in history])]
    accuracy += [Series(f"tier {t}", [s.accuracy_by_tier.get(t) for s in history], dashed=True) for t in tiers]
    sources = sorted({s.accuracy_source for s in history})
    return ('<section id="accuracy"><h2>Accuracy and loss per round</h2>'
            f'<p>Accuracy source: {esc(", ".join(sources))} (held-out: the aggregator\'s evaluation set; '
            "federated: the devices' test splits, weighted by samples).</p>"
            + svg_chart("Accuracy", rounds, accuracy, y_max=1.0, y_label="accuracy")
            + svg_chart("Loss (global model)", rounds, [Series("loss", [s.loss for s in history])], y_label="loss")
            + "</section>")


PERSONAL_SERIES = (("acc_global_mean", "received model, mean"), ("acc_global_worst10", "received model, worst 10%"),
                   ("acc_finetuned_mean", "fine-tuned, mean"), ("acc_finetuned_worst10", "fine-tuned, worst 10%"))


def _section_personalization(history: list[RoundSummary]) -> str:
    """The devices' own accuracies per round (--personalize, --personal-layers), or nothing when none were reported."""
    shown = [(key, label) for key, label in PERSONAL_SERIES if any(key in s.metrics for s in history)]
    if not shown:
        return ""
    rounds = [s.round for s in history]
    series = [Series(label, [s.metrics.get(key) for s in history], dashed=key.endswith("worst10")) for key, label in shown]
    last = next(s for s in reversed(history) if any(key in s.metrics for key, _ in shown))
    rows = [(f"{label} (round {last.round})", num(last.metrics.get(key))) for key, label in shown]
    return ('<section id="personalization"><h2>Personalization</h2>'
            "<p>Each device's accuracy on its own test split, unweighted across devices: the model it received (with "
            "--personal-layers, its own copy of those in place), and with --personalize finetune:K after K local steps "
            f"from it; worst 10%: the mean of the lowest {WORST_FRACTION:.0%} of the devices that answered.</p>"
            + svg_chart("Accuracy on the devices' own data", rounds, series, y_max=1.0, y_label="accuracy")
            + _pairs(rows) + "</section>")


def _section_bytes(history: list[RoundSummary]) -> str:
    rounds = [s.round for s in history]
    series = [Series("up (updates)", [s.bytes_up for s in history]), Series("down (tasks, artifacts)", [s.bytes_down for s in history])]
    return ('<section id="bytes"><h2>Bytes per round</h2>'
            + svg_chart("Bytes on the wire", rounds, series, bars=True, y_format=_bytes, y_label="bytes")
            + "</section>")


def _section_participation(data: RunData) -> str:
    history = data.record.history
    rounds = [s.round for s in history]
    series = [Series("selected", [s.selected for s in history]), Series("answered", [s.answered for s in history])]
    failed = [s.round for s, ok in zip(history, _committed(history)) if not ok]
    body = svg_chart("Devices per round", rounds, series, bars=True, y_label="devices")
    body += f"<p>Failed rounds (too few updates, no new version): {esc(', '.join(map(str, failed)) or 'none')}.</p>"
    if data.ledger and data.ledger.devices:
        devices = data.ledger.devices
        rows = [[esc(d), esc(ok or 0), esc(bad or 0), esc(_bytes(b or 0)), esc(_date(at))] for d, ok, bad, b, at in devices[:MAX_DEVICES]]
        more = f"<p>Only the first {MAX_DEVICES} devices are listed.</p>" if len(devices) > MAX_DEVICES else ""
        body += "<h3>Devices (from the ledger)</h3>" + table(
            ["device", "updates accepted", "messages refused", "bytes accepted", "last seen"], rows) + more
    return '<section id="participation"><h2>Participation</h2>' + body + "</section>"


def _section_rejections(data: RunData) -> str:
    ledger = data.ledger
    if ledger is None:
        totals = _rejected_totals(data.record.history)
        body = f'<p class="note">{esc(data.ledger_note)}; counts below come from the round summaries.</p>'
        body += table(["reason", "refused"], [[esc(r), esc(n)] for r, n in totals.items()]) if totals else "<p>None.</p>"
        return '<section id="rejections"><h2>Rejections</h2>' + body + "</section>"
    decisions = table(["kind", "accepted", "refused"], [
        [esc(kind), esc(ledger.decisions.get((kind, True), 0)), esc(ledger.decisions.get((kind, False), 0))]
        for kind in sorted({k for k, _ in ledger.decisions})])
    reasons = table(["reason", "refused"], [[esc(r), esc(n)] for r, n in ledger.by_reason.items()]) if ledger.by_reason else "<p>None.</p>"
    body = "<h3>Decisions</h3>" + decisions + "<h3>Refused, by reason</h3>" + reasons
    if ledger.refused:
        rows = [[esc(_date(at)), esc("" if rnd is None else rnd), esc(device or "?"), esc(kind), esc(reason), f"<code>{esc(detail)}</code>"]
                for at, rnd, device, kind, reason, detail in ledger.refused]
        body += f"<h3>Last {len(rows)} refused messages</h3>" + table(["at", "round", "device", "kind", "reason", "detail"], rows, "wide")
    return '<section id="rejections"><h2>Rejections</h2>' + body + "</section>"


def _section_rounds(history: list[RoundSummary]) -> str:
    rows = [[esc(s.round), esc(s.version) + ("" if ok else " (failed)"), f"{s.answered}/{s.selected}", num(s.accuracy),
             esc(", ".join(f"{t} {a:.3f}" for t, a in sorted(s.accuracy_by_tier.items())) or "-"), num(s.loss),
             esc(_bytes(s.bytes_up)), esc(_bytes(s.bytes_down)), f"{s.seconds:.1f}"]
            for s, ok in zip(history, _committed(history))]
    return ('<section id="rounds"><h2>Rounds</h2>' + table(
        ["round", "version", "answered", "accuracy", "by tier", "loss", "up", "down", "seconds"], rows, "wide") + "</section>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
table.kv th{background:#f4f4f4;width:11em}thead th{background:#f4f4f4}code{word-break:break-all}
.note{color:#8a5a00}svg.chart{display:block;margin:.8em 0;max-width:100%;height:auto}
svg .title{font-weight:bold;font-size:14px}svg text{font-size:11px;fill:#333}
svg .ytick{text-anchor:end}svg .xtick,svg .axis{text-anchor:middle}svg .grid{stroke:#e4e4e4}svg .frame{stroke:#888}
"""


def render(data: RunData) -> str:
    """The whole HTML page."""
    history = data.record.history
    title = f"TierFL run report: fleet {data.record.fleet}"
    sections = [_section_run(data), _section_configuration(data)]
    if history:
        sections += [_section_curves(history), _section_personalization(history), _section_bytes(history),
                     _section_participation(data)]
    else:
        sections.append("<p>No round has finished yet.</p>")
    sections.append(section_fleet(data.state_dir))
    sections.append(_section_rejections(data))
    if history:
        sections.append(_section_rounds(history))
    generated = _date(datetime.datetime.now(datetime.timezone.utc).timestamp())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><p>Generated {esc(generated)} by "
            f"<code>tierfl report</code>.</p>" + "".join(sections) + "</body></html>\n")
