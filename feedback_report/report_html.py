"""One self-contained HTML quality report: SLO table first, then hand-drawn inline SVG charts.

    html = render_report(stats, quality_summary(stats, cfg), evaluate_slos(stats, cfg, drift), drift)
    write_report_html("gs://bucket/run/quality.html", html)

No script, stylesheet, font or image is fetched: the CSS is inline and every chart is an `<svg>`
drawn here (no plotting library), so the file opens offline and can be attached to an incident.
Each chart is `<svg class="chart" data-chart="<name>">`; `CHARTS` lists the names always present
(with a "no data" note when the run had none), plus one `dist:<feature>` overlay per drifted or
worst-drifting feature when a drift report is given. Hover a bar or point for its exact value.
"""

from __future__ import annotations

import datetime as dt
import html as _html
import math
from collections.abc import Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import contract

__all__ = ["CHARTS", "render_report", "write_report_html"]

CHARTS = (
    "waterfall",
    "events_over_time",
    "dead_letter_reasons",
    "latency",
    "bot_ratio",
    "bots_by_rule",
    "label_coverage",
    "positive_rate",
    "ctr_by_position",
    "catalog_coverage",
    "entropy",
    "drift_psi",
)

COLORS = {
    contract.OUTCOME_VALID: "#2e7d32",
    contract.OUTCOME_DUPLICATE: "#78909c",
    contract.OUTCOME_BOT: "#ef6c00",
    contract.OUTCOME_CONSENT_DROPPED: "#6a1b9a",
    contract.OUTCOME_DEAD_LETTER: "#c62828",
    contract.OUTCOME_TOO_LATE: "#ad1457",
    "input": "#1565c0",
    "other": "#b0bec5",
    "unaccounted": "#212121",
}
BLUE, GREY, RED, AMBER, TEAL = "#1565c0", "#9e9e9e", "#c62828", "#f9a825", "#00838f"
_MAX_DIST_CHARTS = 6
_MAX_CATEGORIES = 20

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f6f8;color:#212121}
main{max-width:1320px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #cfd8dc;padding-bottom:4px}
h3{font-size:14px;margin:0 0 6px;color:#37474f}
.meta{color:#546e7a;font-size:13px}
.banner{padding:10px 14px;border-radius:6px;font-weight:600;margin:12px 0}
.banner.pass{background:#d4edda;color:#155724}.banner.fail{background:#f8d7da;color:#721c24}.banner.warn{background:#fff3cd;color:#856404}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #dee2e6;padding:5px 8px;text-align:left;vertical-align:top}th{background:#eceff1}
tr.pass td{background:#d4edda}tr.fail td{background:#f8d7da}tr.warn td{background:#fff3cd}tr.na td{background:#e2e3e5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(600px,1fr));gap:16px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:12px 14px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:12px;margin:12px 0}
.kpi{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:10px 14px}
.kpi .v{font-size:24px;font-weight:700}.kpi .l{font-size:12px;color:#546e7a}
svg.chart{display:block;max-width:100%;height:auto}
svg text{font-family:inherit}
.note{font-size:12px;color:#546e7a;margin:6px 0 0}
"""  # noqa: E501 - CSS rules kept one per line


# --- formatting ------------------------------------------------------------------------------


def _e(s) -> str:
    return _html.escape(str(s), quote=True)


def _num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3g}"
    v = float(v)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}"


def _pct(v, digits=1) -> str:
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def _ms(v) -> str:
    if v is None:
        return "n/a"
    for div, unit in ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1000, "s")):
        if abs(v) >= div:
            return f"{v / div:.3g} {unit}"
    return f"{v:.0f} ms"


def _hour_label(key: str) -> str:
    try:
        t = dt.datetime.fromisoformat(key.replace("Z", "+00:00"))
        return t.strftime("%m-%d %H:%M")
    except ValueError:
        return key


def _time_ms(ms) -> str:
    if ms is None:
        return "n/a"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * exp >= v * 0.999999:
            return m * exp
    return 10 * exp


def _ticks(vmax: float, n: int = 5) -> list[float]:
    return [vmax * i / n for i in range(n + 1)]


# --- SVG primitives --------------------------------------------------------------------------


class _Svg:
    """A chart canvas with a plot area (margins), y scale and helpers; str() gives the markup."""

    def __init__(
        self, name: str, title: str, width: int = 620, height: int = 300, margin=(36, 20, 62, 64)
    ):  # top, right, bottom, left
        self.name, self.w, self.h = name, width, height
        self.top, self.right, self.bottom, self.left = margin
        self.parts: list[str] = []
        self.title = title

    @property
    def pw(self):
        return self.w - self.left - self.right

    @property
    def ph(self):
        return self.h - self.top - self.bottom

    def y(self, v, vmax):
        return self.top + self.ph * (1 - (v / vmax if vmax else 0))

    def add(self, s: str):
        self.parts.append(s)

    def text(self, x, y, s, anchor="middle", size=11, color="#37474f", weight="normal", rotate=None, halo=False):
        tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
        h = ' stroke="#ffffff" stroke-width="3" paint-order="stroke"' if halo else ""  # readable over bars
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="{color}" '
            f'font-weight="{weight}"{tr}{h}>{_e(s)}</text>'
        )

    def rect(self, x, y, w, h, color, tip=None, opacity=1.0):
        t = f"<title>{_e(tip)}</title>" if tip else ""
        self.add(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" fill="{color}" '
            f'fill-opacity="{opacity}">{t}</rect>'
        )

    def line(self, x1, y1, x2, y2, color="#90a4ae", width=1.0, dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
            f'stroke-width="{width}"{d}/>'
        )

    def thresholds(self, thresholds, vmax, halo=False):
        """Dashed lines across the plot at each (value, label, colour), labelled at the right; None: skipped."""
        for t, label, color in thresholds:
            if t is None:
                continue
            y = self.y(t, vmax)
            self.line(self.left, y, self.left + self.pw, y, color, 1.5, "6 4")
            self.text(self.left + self.pw - 4, y - 4, label, anchor="end", size=10, color=color, halo=halo)

    def y_axis(self, vmax, fmt=_num, label=None, right=False, n=5):
        for t in _ticks(vmax, n):
            y = self.y(t, vmax)
            if not right:
                self.line(self.left, y, self.left + self.pw, y, "#eceff1")
                self.text(self.left - 6, y + 4, fmt(t), anchor="end", size=10)
            else:
                self.text(self.left + self.pw + 6, y + 4, fmt(t), anchor="start", size=10)
        self.line(self.left, self.top, self.left, self.top + self.ph, "#78909c")
        self.line(self.left, self.top + self.ph, self.left + self.pw, self.top + self.ph, "#78909c")
        if label:
            x = self.left + self.pw + 44 if right else 14
            self.text(x, self.top + self.ph / 2, label, size=11, rotate=90 if right else -90)

    def x_labels(self, labels: Sequence[str], xs: Sequence[float], max_labels=14, rotate=False):
        step = max(1, math.ceil(len(labels) / max_labels))
        for i in range(0, len(labels), step):
            y = self.top + self.ph + 14
            if rotate:
                self.text(xs[i], y, labels[i], anchor="end", size=10, rotate=-35)
            else:
                self.text(xs[i], y, labels[i], size=10)

    def legend(self, items: Sequence[tuple[str, str]]):
        x = self.left
        for name, color in items:
            self.rect(x, 8, 11, 11, color)
            self.text(x + 15, 18, name, anchor="start", size=11)
            x += 24 + 6.5 * len(name)

    def no_data(self, why="no data in this run"):
        self.text(self.w / 2, self.h / 2, why, size=14, color="#90a4ae")

    def __str__(self):
        return (
            f'<svg class="chart" data-chart="{_e(self.name)}" viewBox="0 0 {self.w} {self.h}" '
            f'width="{self.w}" height="{self.h}" role="img" aria-label="{_e(self.title)}">'
            f'<rect x="0" y="0" width="{self.w}" height="{self.h}" fill="#ffffff"/>' + "".join(self.parts) + "</svg>"
        )


def _bars(
    name,
    title,
    labels,
    series,
    *,
    stacked=True,
    y_fmt=_num,
    y_label=None,
    thresholds=(),
    width=620,
    height=300,
    rotate=False,
    tip_fmt=_num,
    legend=True,
    ymax=None,
    overlay=None,
) -> str:
    """Vertical bars: series = [(name, values, color)], stacked or grouped; thresholds = [(value, label, color)].

    `overlay(svg, slot)` may draw on top (e.g. percentile markers); bar i spans svg.left + i*slot.
    """
    svg = _Svg(name, title, width, height, margin=(36, 20, 74 if rotate else 40, 64))
    if not labels or not any(v for _, vals, _ in series for v in vals if v):
        svg.no_data()
        return str(svg)
    if stacked:
        top = max(sum(vals[i] or 0 for _, vals, _ in series) for i in range(len(labels)))
    else:
        top = max((v or 0) for _, vals, _ in series for v in vals)
    top = max([top] + [t for t, _, _ in thresholds if t is not None])
    vmax = ymax or _nice_max(top)
    svg.y_axis(vmax, y_fmt, y_label)
    slot = svg.pw / len(labels)
    xs = _draw_bars(svg, labels, series, slot, vmax, stacked, tip_fmt)
    svg.thresholds(thresholds, vmax, halo=True)
    svg.x_labels(labels, xs, rotate=rotate)
    if legend and any(n for n, _, _ in series):
        svg.legend([(n, c) for n, _, c in series])
    if overlay is not None:
        overlay(svg, slot)
    return str(svg)


def _draw_bars(svg, labels, series, slot, vmax, stacked, tip_fmt) -> list[float]:
    """One slot a label, its series stacked or side by side; returns the slot centres."""
    gap = min(slot * 0.2, 8)
    xs = []
    for i, lab in enumerate(labels):
        x0 = svg.left + i * slot + gap / 2
        xs.append(x0 + (slot - gap) / 2)
        base = 0.0
        for k, (sname, vals, color) in enumerate(series):
            v = vals[i] or 0
            if stacked:
                y1, y0 = svg.y(base + v, vmax), svg.y(base, vmax)
                svg.rect(x0, y1, slot - gap, y0 - y1, color, f"{lab} · {sname}: {tip_fmt(v)}")
                base += v
            else:
                bw = (slot - gap) / len(series)
                y1 = svg.y(v, vmax)
                svg.rect(x0 + k * bw, y1, bw, svg.top + svg.ph - y1, color, f"{lab} · {sname}: {tip_fmt(v)}")
    return xs


def _lines(
    name,
    title,
    labels,
    series,
    *,
    y_fmt=_num,
    y_label=None,
    band=None,
    thresholds=(),
    ymax=None,
    shade_from=None,
    width=620,
    height=300,
) -> str:
    """Lines with dots over ordered x; None values leave gaps. band=(low, high) shades the allowed range."""
    svg = _Svg(name, title, width, height, margin=(36, 20, 74, 64))
    vals = [v for _, vs, _ in series for v in vs if v is not None]
    if not labels or not vals:
        svg.no_data()
        return str(svg)
    top = max(vals + [t for t, _, _ in thresholds if t is not None] + ([band[1]] if band else []))
    vmax = ymax or _nice_max(top)
    n = len(labels)
    xs = [svg.left + (svg.pw * (i + 0.5) / n) for i in range(n)]
    if shade_from is not None and 0 <= shade_from < n:
        x0 = svg.left + svg.pw * shade_from / n
        svg.rect(x0, svg.top, svg.left + svg.pw - x0, svg.ph, "#e3f2fd", "SLO window")
        svg.text(x0 + 4, svg.top + 12, "SLO window", anchor="start", size=10, color=BLUE)
    if band is not None:
        lo, hi = band
        y_hi, y_lo = svg.y(min(hi, vmax), vmax), svg.y(lo, vmax)
        svg.rect(svg.left, y_hi, svg.pw, y_lo - y_hi, "#c8e6c9", f"allowed band {y_fmt(lo)} – {y_fmt(hi)}", 0.6)
    svg.y_axis(vmax, y_fmt, y_label)
    svg.thresholds(thresholds, vmax)
    for sname, vs, color in series:
        run: list[str] = []
        for i, v in enumerate(vs):
            if v is None:
                if len(run) > 1:
                    svg.add(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="2"/>')
                run = []
                continue
            run.append(f"{xs[i]:.1f},{svg.y(v, vmax):.1f}")
        if len(run) > 1:
            svg.add(f'<polyline points="{" ".join(run)}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, v in enumerate(vs):
            if v is not None:
                svg.add(
                    f'<circle cx="{xs[i]:.1f}" cy="{svg.y(v, vmax):.1f}" r="3" fill="{color}">'
                    f"<title>{_e(labels[i])} · {_e(sname)}: {_e(y_fmt(v))}</title></circle>"
                )
    svg.x_labels(labels, xs, rotate=True)
    svg.legend([(n_, c) for n_, _, c in series])
    return str(svg)


def _hbars(
    name, title, labels, values, *, fmt=_num, threshold=None, threshold_label="", colors=None, width=620, note=None
) -> str:
    """Horizontal bars, one per label (e.g. PSI per feature), with an optional vertical threshold line."""
    height = max(120, 46 + 24 * max(len(labels), 1))
    label_w = min(220, 20 + 7 * max((len(str(l)) for l in labels), default=4))
    svg = _Svg(name, title, width, height, margin=(30, 70, 22, label_w))
    if not labels:
        svg.no_data(note or "no data in this run")
        return str(svg)
    top = max([v for v in values if v is not None] + ([threshold] if threshold is not None else []) + [0])
    vmax = _nice_max(top)
    row = svg.ph / len(labels)
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = svg.top + i * row
        svg.text(svg.left - 6, y + row / 2 + 4, lab, anchor="end", size=11)
        if v is None:
            svg.text(svg.left + 4, y + row / 2 + 4, "n/a", anchor="start", size=10, color=GREY)
            continue
        w = svg.pw * v / vmax
        color = colors[i] if colors else BLUE
        svg.rect(svg.left, y + row * 0.18, max(w, 1), row * 0.64, color, f"{lab}: {fmt(v)}")
        svg.text(svg.left + max(w, 1) + 4, y + row / 2 + 4, fmt(v), anchor="start", size=10)
    svg.line(svg.left, svg.top, svg.left, svg.top + svg.ph, "#78909c")
    for t in _ticks(vmax, 4):
        x = svg.left + svg.pw * t / vmax
        svg.text(x, svg.top - 6, fmt(t), size=9, color="#78909c")
    if threshold is not None:
        x = svg.left + svg.pw * threshold / vmax
        svg.line(x, svg.top - 2, x, svg.top + svg.ph, RED, 1.5, "6 4")
        svg.text(x + 3, svg.top + svg.ph + 14, threshold_label, anchor="start", size=10, color=RED)
    return str(svg)


# --- the charts ------------------------------------------------------------------------------


def _waterfall(stats: dict) -> str:
    counts, total = stats.get("counts", {}), stats.get("input_records", 0)
    order = sorted(contract.OUTCOMES, key=lambda o: -counts.get(o, 0))
    steps = [(o, counts.get(o, 0)) for o in order]
    unaccounted = total - sum(n for _, n in steps)
    if unaccounted:
        steps.append(("unaccounted", unaccounted))
    svg = _Svg("waterfall", "Accounting waterfall", 1240, 320, margin=(36, 20, 44, 70))
    if not total and not any(n for _, n in steps):
        svg.no_data("no input records")
        return str(svg)
    vmax = _nice_max(max(total, sum(abs(n) for _, n in steps)))
    svg.y_axis(vmax, _num, "records")
    bars = [("input", 0, total)]
    remaining = total
    for o, n in steps:
        bars.append((o, remaining - n, remaining))
        remaining -= n
    slot = svg.pw / len(bars)
    xs = []
    for i, (o, lo, hi) in enumerate(bars):
        x = svg.left + i * slot + slot * 0.15
        xs.append(x + slot * 0.35)
        lo, hi = min(lo, hi), max(lo, hi)
        y1, y0 = svg.y(hi, vmax), svg.y(lo, vmax)
        n = hi - lo
        share = f" ({_pct(n / total, 2)})" if total and o != "input" else ""
        svg.rect(x, y1, slot * 0.7, max(y0 - y1, 1.5), COLORS.get(o, GREY), f"{o}: {n}{share}")
        svg.text(x + slot * 0.35, y1 - 5, f"{_num(n)}{share}", size=10, weight="bold")
        if i + 1 < len(bars):
            svg.line(x + slot * 0.7, y0, x + slot, y0, "#b0bec5", 1, "3 3")
    svg.x_labels([b[0] for b in bars], xs)
    svg.text(
        svg.left + svg.pw,
        18,
        "input_records = "
        + " + ".join(contract.OUTCOMES)
        + ("" if not unaccounted else f"   (unaccounted: {unaccounted})"),
        anchor="end",
        size=11,
        color=RED if unaccounted else "#37474f",
    )
    return str(svg)


def _events_over_time(stats: dict) -> str:
    hourly = stats.get("hourly") or {}
    hours = sorted(hourly)
    names = ("valid", "bots", "dead_letter", "too_late")
    series = [(n, [hourly[h].get(n, 0) for h in hours], COLORS[n]) for n in names]
    other = [max(hourly[h].get("input", 0) - sum(hourly[h].get(n, 0) for n in names), 0) for h in hours]
    series.append(("other (duplicates, consent)", other, COLORS["other"]))
    return _bars(
        "events_over_time",
        "Events per event-time hour, by outcome",
        [_hour_label(h) for h in hours],
        series,
        y_label="events",
        width=1240,
        height=320,
        rotate=True,
    )


def _dead_letters(stats: dict) -> str:
    reasons = sorted((stats.get("dead_letter_by_reason") or {}).items(), key=lambda kv: -kv[1])
    return _hbars(
        "dead_letter_reasons",
        "Dead letters by reason",
        [r for r, _ in reasons],
        [n for _, n in reasons],
        colors=[COLORS["too_late"] if r == "too_late" else COLORS["dead_letter"] for r, _ in reasons],
        note="no dead letters",
    )


def _latency(stats: dict, summary: dict) -> str:
    lat = (stats.get("latency_ms") or {}).get("arrival_minus_event") or {}
    edges, counts = lat.get("edges") or [], lat.get("counts") or []
    labels = [f"≤{_ms(e)}" for e in edges] + ([f">{_ms(edges[-1])}"] if edges else [])

    def markers(svg: _Svg, slot: float):
        # percentile markers: x interpolated inside the bucket, as histogram_percentile does
        for k, (name, color) in enumerate((("p50", "#2e7d32"), ("p95", AMBER), ("p99", RED))):
            v = summary["latency_ms"].get(name)
            if v is None:
                continue
            i = next((j for j, e in enumerate(edges) if v <= e), len(edges))
            lo = (0.0 if edges[0] > 0 else edges[0]) if i == 0 else edges[i - 1]
            hi = edges[i] if i < len(edges) else lo
            x = svg.left + slot * (i + ((v - lo) / (hi - lo) if hi > lo else 1.0))
            svg.line(x, svg.top, x, svg.top + svg.ph, color, 1.5, "5 3")
            svg.text(x + 3, svg.top + 10 + 12 * k, f"{name} {_ms(v)}", anchor="start", size=10, color=color, halo=True)

    return _bars(
        "latency",
        "Arrival − event time",
        labels,
        [("", list(counts), TEAL)],
        y_label="events",
        rotate=True,
        legend=False,
        overlay=markers,
    )


def _bot_ratio(summary: dict, band) -> str:
    hourly = summary["bots"]["hourly"]
    hours = list(hourly)
    return _lines(
        "bot_ratio",
        "Bot ratio per hour",
        [_hour_label(h) for h in hours],
        [("bots / (valid + bots)", [hourly[h] for h in hours], COLORS["bots"])],
        y_fmt=lambda v: _pct(v, 0),
        band=tuple(band) if band else None,
    )


def _bots_by_rule(summary: dict) -> str:
    rules = summary["bots"]["by_rule"]
    return _hbars(
        "bots_by_rule",
        "Bot ratio by rule",
        list(rules),
        list(rules.values()),
        fmt=lambda v: _pct(v, 2),
        colors=[COLORS["bots"]] * len(rules),
        note="no bots flagged",
    )


def _label_coverage(summary: dict, coverage_min) -> str:
    lab = summary["labels"]
    exposures = lab["exposures"]
    svg = _Svg("label_coverage", "Label coverage", 620, 170, margin=(40, 30, 50, 20))
    if not exposures:
        svg.no_data("no exposures")
        return str(svg)
    pos, neg = lab["positives"], lab["negatives"]
    other_labels = max(lab["labels"] - pos - neg, 0)
    unlabelled = max(exposures - lab["labels"], 0)
    vmax = max(exposures, lab["labels"])
    x = svg.left
    y, h = svg.top + 10, 44
    for name, n, color in (
        ("positives", pos, "#2e7d32"),
        ("negatives", neg, "#90caf9"),
        ("other labels", other_labels, "#b0bec5"),
        ("unlabelled exposures", unlabelled, RED),
    ):
        w = svg.pw * n / vmax
        if n:
            svg.rect(x, y, w, h, color, f"{name}: {n} ({_pct(n / exposures)})")
            if w > 60:
                svg.text(
                    x + w / 2, y + h / 2 + 4, f"{_num(n)}", size=11, color="#fff" if color != "#90caf9" else "#0d47a1"
                )
        x += w
    svg.legend(
        [("positives", "#2e7d32"), ("negatives", "#90caf9"), ("other labels", "#b0bec5"), ("unlabelled exposures", RED)]
    )
    if coverage_min is not None:
        tx = svg.left + svg.pw * coverage_min * exposures / vmax
        svg.line(tx, y - 8, tx, y + h + 8, "#212121", 2, "4 3")
        svg.text(tx, y + h + 22, f"min coverage {_pct(coverage_min)}", size=10, color="#212121")
    svg.text(
        svg.left,
        y + h + 40,
        f"coverage {_pct(lab['coverage'], 2)} = {lab['labels']} labels / {exposures} exposures;"
        f" orphan outcomes {lab['orphan_outcomes']}, late outcomes {lab['late_outcomes']}",
        anchor="start",
        size=11,
    )
    return str(svg)


def _positive_rate(stats: dict) -> str:
    hourly = stats.get("hourly") or {}
    hours = [h for h in sorted(hourly)]
    rate = [
        (hourly[h].get("positives", 0) / hourly[h]["exposures"]) if hourly[h].get("exposures") else None for h in hours
    ]
    return _lines(
        "positive_rate",
        "Positives per exposure, per hour",
        [_hour_label(h) for h in hours],
        [("positives / exposures", rate, "#2e7d32")],
        y_fmt=lambda v: _pct(v, 1),
    )


def _ctr_by_position(summary: dict, drift: dict | None) -> str:
    rows = summary["ctr_by_position"]
    labels = [str(r["position"]) for r in rows]
    series = [("this run", [r["ctr"] for r in rows], BLUE)]
    if drift and drift.get("ctr_by_position"):
        base = drift["ctr_by_position"]
        series.append(("baseline", [(base.get(r["position"]) or {}).get("baseline") for r in rows], GREY))
    return _bars(
        "ctr_by_position",
        "CTR by position",
        labels,
        series,
        stacked=False,
        y_fmt=lambda v: _pct(v, 1),
        tip_fmt=lambda v: _pct(v, 2),
        y_label="positives / exposures",
    )


def _diversity_by_hour(stats: dict, series, missing=None) -> tuple[list[str], list]:
    """Hour labels and a series for each (name, diversity key, colour); `missing` where an hour lacks the key."""
    div = stats.get("diversity") or {}
    ws = sorted(div)
    return [_hour_label(w) for w in ws], [(n, [div[w].get(k, missing) for w in ws], c) for n, k, c in series]


def _catalog_coverage(stats: dict) -> str:
    labels, series = _diversity_by_hour(
        stats, [("exposed items", "exposure_items", BLUE), ("positive items", "positive_items", "#2e7d32")], 0
    )
    return _bars(
        "catalog_coverage",
        "Distinct items per hour",
        labels,
        series,
        stacked=False,
        y_label="distinct items",
        rotate=True,
    )


def _entropy(stats: dict, n_windows: int) -> str:
    labels, series = _diversity_by_hour(
        stats, [("exposure entropy", "exposure_entropy", BLUE), ("positive entropy", "positive_entropy", "#2e7d32")]
    )
    return _lines(
        "entropy",
        "Entropy per hour (bits)",
        labels,
        series,
        y_fmt=lambda v: f"{v:.1f}",
        y_label="bits",
        shade_from=max(len(labels) - n_windows, 0),
    )


def _drift_psi(drift: dict | None) -> str:
    if not drift:
        return _hbars("drift_psi", "PSI per feature", [], [], note="no baseline given: drift not computed")
    feats = sorted(drift["features"].items(), key=lambda kv: -(kv[1]["psi"] or 0))
    t = drift["thresholds"].get("psi_max")
    labels = [n for n, _ in feats]
    values = [f["psi"] for _, f in feats]
    colors = [RED if f["drifted"] else (GREY if not f["comparable"] else BLUE) for _, f in feats]
    return _hbars(
        "drift_psi",
        "PSI per feature vs baseline",
        labels,
        values,
        fmt=lambda v: f"{v:.3f}",
        threshold=t,
        threshold_label=f"psi_max {t:g}" if t is not None else "",
        colors=colors,
        width=1240,
    )


def _dist_overlay(name: str, f: dict) -> str:
    bins, base, cur = f["bins"], f["baseline"], f["current"]
    if f["kind"] == "categorical" and len(bins) > _MAX_CATEGORIES:
        keep = sorted(range(len(bins)), key=lambda i: -max(base[i], cur[i]))[:_MAX_CATEGORIES]
        keep.sort()
        bins, base, cur = [bins[i] for i in keep], [base[i] for i in keep], [cur[i] for i in keep]
    title = f"{name}: PSI {f['psi']:.3f}, JS {f['js']:.3f}" + (
        f", L∞ {f['linf']:.3f}" if f["kind"] == "categorical" else ""
    )
    chart = _bars(
        f"dist:{name}",
        title,
        bins,
        [("baseline", base, GREY), ("this run", cur, RED if f["drifted"] else BLUE)],
        stacked=False,
        y_fmt=lambda v: _pct(v, 0),
        tip_fmt=lambda v: _pct(v, 2),
        rotate=True,
    )
    return f'<div class="card"><h3>{_e(title)}</h3>{chart}</div>'


# --- page ------------------------------------------------------------------------------------


def _table(columns: Sequence[str], rows: str, empty_row: str = "", css_class: str = "") -> str:
    """A table with a header row of `columns`; `rows` is the body's markup, `empty_row` stands in when it has none."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{rows or empty_row}</tbody></table>"


def _slo_table(slo_results: Sequence[dict], mode: str) -> str:
    rows = []
    for r in slo_results:
        if r["ok"] is True:
            cls, status = "pass", "PASS"
        elif r["ok"] is False:
            cls, status = ("warn", "WARN") if mode == "warn" else ("fail", "FAIL")
        else:
            cls, status = "na", "n/a"
        rows.append(
            f'<tr class="{cls}"><td><b>{status}</b></td><td>{_e(r["slo"])}</td>'
            f'<td class="num">{_e(_slo_value(r["value"]))}</td><td class="num">{_e(_slo_value(r["threshold"]))}</td>'
            f"<td>{_e(r['message'])}</td></tr>"
        )
    return _table(
        ("status", "SLO", "value", "threshold", "detail"),
        "".join(rows),
        '<tr class="na"><td colspan="5">no SLO gates enabled</td></tr>',
        css_class="slos",
    )


def _slo_value(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_slo_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _kpis(summary: dict) -> str:
    lat = summary["latency_ms"]
    items = [
        ("input records", _num(summary["input_records"])),
        ("ingestion success", _pct(summary["ingestion"]["success_rate"], 3)),
        ("label coverage", _pct(summary["labels"]["coverage"], 2)),
        (
            "latency p50 / p95 / p99",
            f"{_ms(lat['p50'])} / {_ms(lat['p95'])} / {_ms(lat['p99'])}" + (" +" if lat.get("p99_in_overflow") else ""),
        ),
        ("bot ratio", _pct(summary["bots"]["ratio"], 2)),
        ("orphan outcomes / exposure", _pct(summary["labels"]["orphan_ratio"], 2)),
    ]
    return _kpi_grid(items)


def _kpi_grid(items) -> str:
    """Big figures in a row: items = [(label, value text)]."""
    return (
        '<div class="kpis">'
        + "".join(f'<div class="kpi"><div class="v">{_e(v)}</div><div class="l">{_e(l)}</div></div>' for l, v in items)
        + "</div>"
    )


def _freshness_table(summary: dict) -> str:
    rows = "".join(
        f'<tr><td>{_e(c)}</td><td class="num">{f["events"]}</td><td>{_e(_time_ms(f["latest_event_time_ms"]))}</td>'
        f'<td class="num">{_e(_ms(f["age_ms"]))}</td></tr>'
        for c, f in summary["freshness"].items()
    )
    return _table(
        ("cohort", "events", "latest event time", "age at run end"), rows, "<tr><td colspan=4>no cohorts</td></tr>"
    )


def _drift_table(drift: dict) -> str:
    rows = []
    for n, f in sorted(drift["features"].items(), key=lambda kv: -(kv[1]["psi"] or 0)):
        cls = "fail" if f["drifted"] else ("na" if not f["comparable"] else "pass")
        cells = "".join(
            f'<td class="num">{"n/a" if f[m] is None else f"{f[m]:.4f}"}</td>' for m in ("psi", "js", "linf")
        )
        rows.append(
            f'<tr class="{cls}"><td>{_e(n)}</td><td>{_e(f["kind"])}</td>{cells}'
            f'<td class="num">{f["baseline_count"]}</td><td class="num">{f["current_count"]}</td>'
            f"<td>{_e(f['message'])}</td></tr>"
        )
    return _table(("feature", "kind", "PSI", "JS", "L∞", "baseline n", "run n", "status"), "".join(rows))


def _privacy(stats: dict) -> str:
    """PII found at the source per field and kind, and how much of it was redacted before any sink."""
    p = stats.get("privacy")
    if not p:
        return '<p class="note">No privacy counters in this run (the runner reported no metrics).</p>'
    kpis = [
        ("privacy compliance", _pct(p["compliance_rate"], 2)),
        ("PII found at source", _num(p["found"])),
        ("redacted before any sink", _num(p["redacted"])),
        ("not redacted", _num(p["not_redacted"])),
    ]
    kinds = sorted({k for ks in p["found_by_field_kind"].values() for k in ks})
    rows = "".join(
        f"<tr><td>{_e(f)}</td>"
        + "".join(f'<td class="num">{ks.get(k, 0)}</td>' for k in kinds)
        + f'<td class="num">{sum(ks.values())}</td></tr>'
        for f, ks in p["found_by_field_kind"].items()
    )
    table = _table(("field", *kinds, "total"), rows, "<tr><td colspan=2>no PII found at the source</td></tr>")
    return _kpi_grid(kpis) + table


def _banner(slo_results: Sequence[dict], mode: str, gate: str) -> str:
    """Green when no gate is breached, else the number of breaches (amber in warn mode, red otherwise)."""
    n_breach = sum(1 for r in slo_results if r["ok"] is False)
    if not n_breach:
        return f'<div class="banner pass">All evaluated {gate}s met.</div>'
    cls = "warn" if mode == "warn" else "fail"
    return (
        f'<div class="banner {cls}">{n_breach} {gate} breach{"es" if n_breach > 1 else ""}'
        + (" (warn mode: the job does not fail)" if mode == "warn" else "")
        + "</div>"
    )


def _opening(title: str, meta: str, slo_results: Sequence[dict], mode: str, gate: str, heading: str) -> list[str]:
    """What a report starts with: title, a line about the run, the verdict banner and the gate table."""
    return [
        f"<h1>{_e(title)}</h1>",
        f'<div class="meta">{_e(meta)}</div>',
        _banner(slo_results, mode, gate),
        f"<h2>{heading}</h2>",
        _slo_table(slo_results, mode),
    ]


def _page(title: str, parts: Sequence[str]) -> str:
    """The HTML document around the report's parts, one a line."""
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )


def _grid(*cards: str) -> list[str]:
    """Cards side by side (as many as fit the width)."""
    return ['<div class="grid">', *cards, "</div>"]


def _card(title: str, body: str, note: str = "") -> str:
    n = f'<p class="note">{_e(note)}</p>' if note else ""
    return f'<div class="card"><h3>{_e(title)}</h3>{body}{n}</div>'


def render_report(
    stats: dict,
    summary: dict,
    slo_results: Sequence[dict],
    drift: dict | None = None,
    title: str = "Signal quality report",
    mode: str = "fail",
    coverage_min: float | None = None,
    bot_ratio_band=None,
    entropy_windows: int | None = None,
) -> str:
    """The whole report as one HTML string (inline CSS and SVG only).

    Thresholds drawn on charts come from `slo_results` when present (label_coverage, bot_ratio);
    the keyword arguments override them. `mode` colours breaches red (fail) or amber (warn).
    `entropy_windows` (default: as many as the summary's entropy trend holds) is shaded on the entropy chart.
    """
    by_slo = {r["slo"]: r for r in slo_results}
    if coverage_min is None and "label_coverage" in by_slo:
        coverage_min = by_slo["label_coverage"]["threshold"]
    if bot_ratio_band is None and "bot_ratio" in by_slo:
        bot_ratio_band = by_slo["bot_ratio"]["threshold"]
    if entropy_windows is None:  # the summary holds the last N windows, N = slos.entropy_windows
        entropy_windows = len((summary.get("entropy_trend") or {}).get("windows") or []) or 6
    parts = [
        *_opening(title, _run_meta(summary), slo_results, mode, "SLO", "SLOs"),
        _kpis(summary),
        *_accounting_part(stats, summary),
        *_privacy_part(stats),
        *_bots_part(summary, bot_ratio_band),
        *_labels_part(stats, summary, coverage_min, drift),
        *_diversity_part(stats, entropy_windows),
        *_drift_part(drift),
    ]
    return _page(title, parts)


def _run_meta(summary: dict) -> str:
    acc = summary["accounting"]
    return (
        f"run end (latest event time): {_time_ms(summary.get('run_end_ms'))} · input records "
        f"{summary['input_records']} · accounting identity {'holds' if acc['holds'] else 'BROKEN'} "
        f"(sum of outcomes {acc['sum_of_outcomes']}) · ingestion success = {summary['ingestion']['definition']}"
    )


def _accounting_part(stats: dict, summary: dict) -> list[str]:
    return [
        "<h2>Accounting</h2>",
        _card(
            "Accounting waterfall: input → each outcome",
            _waterfall(stats),
            "Every input record ends in exactly one outcome; the last step must reach 0.",
        ),
        _card("Events over event time (hourly, stacked by outcome)", _events_over_time(stats)),
        *_grid(
            _card("Dead letters by reason", _dead_letters(stats)),
            _card(
                "Lateness: arrival − event time",
                _latency(stats, summary),
                "Bars are histogram buckets; dashed lines are p50/p95/p99 interpolated within a bucket.",
            ),
        ),
    ]


def _privacy_part(stats: dict) -> list[str]:
    return [
        "<h2>Privacy</h2>",
        _card(
            "PII found at the source, by field and kind",
            _privacy(stats),
            "Every string value and key is scanned (e-mail, phone, IP); compliance = redacted / found, must be 100%.",
        ),
    ]


def _bots_part(summary: dict, bot_ratio_band) -> list[str]:
    return [
        "<h2>Bots</h2>",
        *_grid(
            _card(
                "Bot ratio over time",
                _bot_ratio(summary, bot_ratio_band),
                "Green band: allowed range (bot_ratio_band).",
            ),
            _card("Bot ratio by rule", _bots_by_rule(summary)),
        ),
    ]


def _labels_part(stats: dict, summary: dict, coverage_min, drift: dict | None) -> list[str]:
    return [
        "<h2>Labels</h2>",
        *_grid(
            _card("Label coverage", _label_coverage(summary, coverage_min)),
            _card("Positive rate over time", _positive_rate(stats)),
            _card("CTR by position", _ctr_by_position(summary, drift)),
            _card("Freshness per cohort", _freshness_table(summary)),
        ),
    ]


def _diversity_part(stats: dict, entropy_windows: int) -> list[str]:
    return [
        "<h2>Diversity</h2>",
        *_grid(
            _card("Catalog coverage over windows", _catalog_coverage(stats)),
            _card(
                "Entropy over windows",
                _entropy(stats, entropy_windows),
                "Shaded: the windows the entropy-drop SLO looks at.",
            ),
        ),
    ]


def _drift_part(drift: dict | None) -> list[str]:
    """PSI per feature; with a drift report, its table and distribution overlays, drifted features first."""
    parts = [
        "<h2>Drift vs baseline</h2>",
        _card("PSI per feature (dashed: threshold; red: drifted, grey: not comparable)", _drift_psi(drift)),
    ]
    if not drift:
        return parts
    parts.append(_card("Drift detail", _drift_table(drift)))
    comparable = [(n, f) for n, f in drift["features"].items() if f["comparable"]]
    comparable.sort(key=lambda kv: (not kv[1]["drifted"], -(kv[1]["psi"] or 0)))
    if comparable:
        parts.extend(_grid(*(_dist_overlay(n, f) for n, f in comparable[:_MAX_DIST_CHARTS])))
    return parts


def write_report_html(path: str, html: str) -> None:
    """Write the report with Beam's FileSystems (local paths, gs://, s3://, ...)."""
    with FileSystems.create(path, mime_type="text/html", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(html.encode("utf-8"))


# --- evaluation report (pipelines.evaluate) --------------------------------------------------


def _f(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _ci(row: dict) -> str:
    if row.get("ci_low") is None:
        return "n/a"
    return f"[{_f(row['ci_low'])}, {_f(row['ci_high'])}]"


def _ope_section(ope: dict) -> str:
    est = ope.get("estimates") or {}
    rows = "".join(
        f'<tr><td>{_e(m.upper())}</td><td class="num">{_e(_f(v["value"], 6))}</td>'
        f'<td class="num">{_e(_ci(v))}</td></tr>'
        for m, v in est.items()
    )
    table = _table(
        ("estimator", "estimate", "bootstrap CI"), rows, "<tr><td colspan=3>no exposure with a propensity</td></tr>"
    )
    d = ope.get("diagnostics") or {}
    kpis = [
        ("exposures / requests", f"{ope.get('exposures', 0)} / {ope.get('requests', 0)}"),
        ("on-policy mean reward", _f(ope.get("on_policy_mean"))),
        ("effective sample size", f"{_f(d.get('ess'), 6)} ({_pct(d.get('ess_share'), 2)})"),
        ("max / mean weight", f"{_f(d.get('max_weight'))} / {_f(d.get('mean_weight'))}"),
        ("clipped exposures", str(d.get("clipped_exposures", "n/a"))),
        (
            "excluded labels",
            f"{sum((ope.get('excluded') or {}).values())} ({_pct(ope.get('excluded_share'), 2)})"
            + "".join(f"; {k} {v}" for k, v in (ope.get("excluded") or {}).items()),
        ),
    ]
    kpi = _kpi_grid(kpis)
    chart = _hbars(
        "ope_estimates",
        "Policy value estimates",
        [m.upper() for m in est],
        [v["value"] for v in est.values()],
        fmt=lambda v: f"{v:.4g}",
        threshold=ope.get("on_policy_mean"),
        threshold_label="logged (on-policy) mean",
    )
    boot = ope.get("bootstrap") or {}
    note = (
        f"Target policy {ope.get('target_policy')}, reward {ope.get('reward')}, clip {ope.get('clip')}; "
        f"{boot.get('samples', 0)} bootstrap replicates over requests, seed {boot.get('seed')}."
    )
    return kpi + "".join(_grid(_card("Estimates", table, note), _card("Estimates vs logged mean", chart)))


def _position_bias_section(pb: dict) -> str:
    curve = pb.get("curve")
    if not curve:
        return _card(
            "Examination propensity by position",
            _lines("position_bias", "propensity", [], []),
            pb.get("error") or "no slates",
        )
    labels = [str(i + 1) for i, n in enumerate(curve["exposures"]) if n]
    idx = [i for i, n in enumerate(curve["exposures"]) if n]
    series = [("examination propensity", [curve["propensity"][i] for i in idx], BLUE)]
    if curve.get("naive_ctr_ratio"):
        series.append(("naive CTR ratio", [curve["naive_ctr_ratio"][i] for i in idx], GREY))
    chart = _lines("position_bias", "Examination propensity by position", labels, series, y_fmt=lambda v: f"{v:.2f}")
    w = (pb.get("weights") or {}).get("positions") or {}
    w = dict(sorted(w.items(), key=lambda kv: int(kv[0])))
    rows = "".join(
        f'<tr><td>{_e(k)}</td><td class="num">{_f(v["propensity"])}</td><td class="num">{_f(v["weight"])}</td>'
        f'<td class="num">{_num(v["exposures"])}</td></tr>'
        for k, v in w.items()
    )
    table = _table(("position", "propensity", "weight", "exposures"), rows)
    fit = ""
    if curve.get("method") == "em":
        fit = (
            f" EM {'converged' if curve.get('converged') else 'did NOT converge'} in {curve.get('iterations')} "
            f"iterations (last change {_f(curve.get('final_change'), 3)}); {_num(curve.get('items_own_relevance'))} "
            f"of {_num(curve.get('items'))} items have their own relevance, the rest share one."
        )
    note = (
        f"method {pb['method']} ({_num(pb.get('randomised_exposures'))} randomised exposures); relative to "
        "position 1. The weights are written to position_weights.json for labels.position_weights." + fit
    )
    return "".join(
        _grid(_card("Examination propensity by position", chart, note), _card("Inverse-propensity weights", table))
    )


def _experiments_section(exps: dict) -> str:
    if not exps:
        return _card("Experiments", '<p class="note">no labels carry an experiment_id</p>')
    parts = []
    for exp_id, exp in exps.items():
        rows = []
        for v, r in exp["variants"].items():
            vs = r.get("vs_control") or {}
            cells = []
            for m in ("ctr", "conversion", "value"):
                d = vs.get(m)
                diff = (
                    ""
                    if d is None
                    else (
                        f" ({'+' if (d['diff'] or 0) >= 0 else ''}{_f(d['diff'])} "
                        f"[{_f(d['ci_low'])}, {_f(d['ci_high'])}])"
                        if d["diff"] is not None
                        else " (n/a)"
                    )
                )
                cls = ' style="font-weight:700"' if d and d.get("significant") else ""
                cells.append(f'<td class="num"{cls}>{_e(_f(r[m]["value"]))}{_e(diff)}</td>')
            ctl = " (control)" if v == exp["control"] else ""
            rows.append(
                f'<tr><td>{_e(v + ctl)}</td><td class="num">{r["units"]}</td>'
                f'<td class="num">{_num(r["exposures"])}</td>{"".join(cells)}</tr>'
            )
        srm = exp.get("srm")
        if srm and srm.get("p_value") is not None:
            status = "OK" if srm["ok"] is not False else "SAMPLE RATIO MISMATCH"
            srm_note = (
                f"SRM: chi-square {srm['chi2']:.3f}, df {srm['df']}, p = {srm['p_value']:.3g} "
                f"(alpha {srm['alpha']}) - {status}"
            )
        else:
            srm_note = "SRM: not checked (no split configured for this experiment)"
        table = _table(
            ("variant", f"{exp['unit']}s", "exposures", "CTR", "conversion", "value / exposure"), "".join(rows)
        )
        parts.append(
            _card(
                f"Experiment {exp_id}",
                table,
                f"Differences vs {exp['control']} with {100 * exp['confidence']:g}% delta-method CIs "
                f"(clustered by {exp['unit']}); bold: the CI excludes 0. {srm_note}",
            )
        )
    return "".join(_grid(*parts))


def _cold_start_section(cs: dict) -> str:
    buckets = cs.get("buckets") or []
    labels = [_time_ms(b["bucket_start_ms"])[:16] for b in buckets]
    share = _lines(
        "cold_start",
        "New-item share",
        labels,
        [
            ("exposures", [None if b["censored"] else b["new_exposure_share"] for b in buckets], BLUE),
            ("clicks", [None if b["censored"] else b["new_click_share"] for b in buckets], TEAL),
        ],
        y_fmt=lambda v: _pct(v, 1),
    )
    conc = _lines(
        "concentration",
        "Item-exposure concentration",
        labels,
        [("Gini", [b["gini"] for b in buckets], RED), ("top-1% share", [b["top1pct_share"] for b in buckets], AMBER)],
        y_fmt=lambda v: f"{v:.2f}",
        ymax=1.0,
    )
    note = (
        f"New: first seen within {cs.get('new_item_age_s', 0) / 86400:g} d of the exposure; buckets of "
        f"{cs.get('bucket_s', 0) / 3600:g} h. Buckets closer than that to the data start are censored (not drawn). "
        f"Whole run: {_pct(cs.get('new_exposure_share'))} of exposures, {_pct(cs.get('new_click_share'))} of clicks."
    )
    return "".join(
        _grid(
            _card("Cold start: share going to new items", share, note),
            _card("Feedback loop: exposure concentration", conc),
        )
    )


def render_evaluation_report(
    evaluation: dict, slo_results: Sequence[dict], title: str = "Evaluation report", mode: str = "fail"
) -> str:
    """The evaluation job's report: gates, off-policy estimates, position bias, experiments, cold start."""
    parts = [
        *_opening(title, evaluation.get("labels", ""), slo_results, mode, "gate", "Gates"),
        "<h2>Off-policy evaluation</h2>",
        _ope_section(evaluation.get("ope") or {}),
        "<h2>Position bias</h2>",
        _position_bias_section(evaluation.get("position_bias") or {}),
        "<h2>Experiments</h2>",
        _experiments_section((evaluation.get("experiments") or {}).get("experiments") or {}),
        "<h2>Cold start and feedback loop</h2>",
        _cold_start_section(evaluation.get("cold_start") or {}),
    ]
    return _page(title, parts)
