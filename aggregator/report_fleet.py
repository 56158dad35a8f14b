"""The report's fleet diagnostics: data heterogeneity from analytics answers, system heterogeneity from the
aggregator's own records, and the analytics queries run (aggregator.report draws the page around it).

Data heterogeneity comes only from analytics results (STATE_DIR/analytics.jsonl): the newest plain
label histogram's diagnostics (per device, without ids: its sample count and the total variation
distance of its label mix from the fleet's), never from raw data. System heterogeneity comes from
STATE_DIR/fleet.json (aggregator.fleet_record: the registry sampled while the status server ran):
training speed per tier, each device's availability and how often it answered tasks and queries.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from aggregator.analytics import RESULTS_FILE
from aggregator.fleet_record import FLEET_FILE, FleetFile, read_fleet, read_results
from aggregator.report_html import Series, esc, num, svg_chart, table

MAX_BARS = 200  # devices drawn in one chart


def section_fleet(state_dir: Path) -> str:
    """The "Fleet diagnostics" section, or a note saying what to run to get it."""
    results = read_results(state_dir, RESULTS_FILE)
    fleet = read_fleet(state_dir)
    unread = ""
    if fleet is None and (state_dir / FLEET_FILE).exists():
        unread += (f"<p>{esc(state_dir / FLEET_FILE)} does not read: the aggregator rewrites it on its next sample "
                   "(or delete it).</p>")
    if not results and fleet is None:
        return ('<section id="fleet"><h2>Fleet diagnostics</h2>' + unread + "<p>No analytics results or fleet record "
                "in this state directory: run the aggregator with <code>--status-port</code> and ask the fleet with "
                "<code>tierfl analytics label_histogram</code> (README: Ask the fleet).</p></section>")
    try:
        data, queries = _data_heterogeneity(results), _queries(results)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a line that parses but is no result of ours
        data, queries = (f"<p>{esc(state_dir / RESULTS_FILE)} holds a line that is not an analytics result "
                         f"({esc(type(exc).__name__)}: {esc(str(exc)[:200])}): move the file aside to start the "
                         "record anew.</p>"), ""
    body = unread + data + (_system_heterogeneity(fleet) if fleet else "") + queries
    return '<section id="fleet"><h2>Fleet diagnostics</h2>' + body + "</section>"


def _data_heterogeneity(results: list[dict]) -> str:
    newest = next((r for r in reversed(results) if r.get("diagnostics") and r.get("status") == "answered"), None)
    if newest is None:
        return ("<h3>Data heterogeneity</h3><p>No plain label histogram was answered yet (secure or noisy ones "
                "release no per-device figures): <code>tierfl analytics label_histogram</code>.</p>")
    skew = newest["diagnostics"]
    sizes, distances = skew["samples_per_device"][:MAX_BARS], skew["label_distance"][:MAX_BARS]
    ranks = list(range(1, len(sizes) + 1))
    counts = newest["answer"]["counts"]
    mean = statistics.fmean(sizes) if sizes else 0.0
    spread = statistics.pstdev(sizes) / mean if mean else 0.0
    text = (f"<p>From query {esc(newest.get('number'))} ({esc(newest.get('answered'))} devices): sample counts from "
            f"{esc(f'{min(sizes):.0f}')} to {esc(f'{max(sizes):.0f}')} (coefficient of variation {spread:.2f}); "
            f"label mix distance from the fleet's (total variation, 0 = the fleet's mix, 1 = disjoint) mean "
            f"{statistics.fmean(distances):.2f}, largest {max(distances):.2f}.</p>")
    return ("<h3>Data heterogeneity (from analytics answers)</h3>" + text
            + svg_chart("Fleet label histogram", list(range(len(counts))), [Series("samples", counts)], bars=True,
                        y_label="samples", x_label="label")
            + svg_chart("Quantity skew: samples per device", ranks, [Series("samples", sizes)], bars=True,
                        y_label="samples", x_label="device, largest first")
            + svg_chart("Label skew: distance of each device's label mix from the fleet's", ranks,
                        [Series("total variation distance", distances)], bars=True, y_max=1.0,
                        x_label="device, largest first"))


def _system_heterogeneity(fleet: FleetFile) -> str:
    devices = sorted(fleet.devices.items())[:MAX_BARS]
    if not devices:
        return ""
    by_tier: dict[str, list[float]] = {}
    for _, row in devices:
        for tier, speed in row.seconds_per_sample.items():
            by_tier.setdefault(tier, []).append(speed * 1000)
    tiers = sorted(by_tier)
    rows = [[esc(t), esc(len(by_tier[t])), num(statistics.median(by_tier[t]), 3), num(max(by_tier[t]), 3)]
            for t in tiers]
    names = [name for name, _ in devices]
    availability = [row.online_samples / row.seen_samples if row.seen_samples else None for _, row in devices]
    tasks = [row.tasks_answered / row.tasks_asked if row.tasks_asked else None for _, row in devices]
    queries = [row.queries_answered / row.queries_asked if row.queries_asked else None for _, row in devices]
    out = "<h3>System heterogeneity (from the aggregator's records)</h3>"
    if tiers:
        out += svg_chart("Training speed per tier (median ms per sample)", tiers,  # type: ignore[arg-type]
                         [Series("median", [statistics.median(by_tier[t]) for t in tiers]),
                          Series("slowest", [max(by_tier[t]) for t in tiers])], bars=True, y_label="ms per sample",
                         x_label="tier")
        out += table(["tier", "devices", "median ms per sample", "slowest ms per sample"], rows)
    out += svg_chart("Availability and answer rates per device", names,  # type: ignore[arg-type]
                     [Series("online", availability), Series("tasks answered", tasks),
                      Series("queries answered", queries)], bars=True, y_max=1.0, y_format=lambda v: f"{v:.0%}",
                     x_label="device")
    return out


def _queries(results: list[dict]) -> str:
    if not results:
        return ""
    rows = []
    for r in results[-50:][::-1]:
        privacy = r.get("privacy") or {}
        epsilon = f"{privacy['epsilon']:.3g} (total {privacy['epsilon_total']:.3g})" if privacy.get("dp") else "none"
        rows.append([esc(r.get("number")), esc(r.get("computation")), esc(r.get("status")),
                     esc(f"{r.get('answered', 0)}/{r.get('asked', 0)}"), esc("yes" if r.get("secure") else "no"),
                     esc(epsilon), esc(r.get("reason") or "")])
    return ("<h3>Analytics queries (newest first)</h3>"
            + table(["query", "computation", "status", "answered/asked", "secure", "DP epsilon", "reason"], rows))
