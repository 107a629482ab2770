"""The HTML quality report: self-contained, one <svg> per chart, and it renders in headless Chromium."""

import math
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from feedback_report.report_html import CHARTS, render_report, write_report_html
from transforms import accounting
from transforms.quality import QualityConfig, drift_report, evaluate_slos, quality_summary

HOURS = [f"2026-11-01T{h:02d}:00:00Z" for h in range(24)]
LATENCY_EDGES = [100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 3600000]
DWELL_EDGES = [0, 500, 1000, 2000, 5000, 10000, 30000, 60000]
INSTALL_HINT = (
    "chromium not found: run `bash .ci/install-chromium` (as root: apt-get update && apt-get install -y chromium)"
)
# colours the report must paint: SLO pass / fail rows, outcome colours, drifted bar
PASS_RGB, FAIL_RGB, VALID_RGB, BOT_RGB, RED_RGB = (
    (212, 237, 218),
    (248, 215, 218),
    (46, 125, 50),
    (239, 108, 0),
    (198, 40, 40),
)


def _hist(values, edges):
    idx = np.searchsorted(np.asarray(edges, dtype=float), np.asarray(values, dtype=float), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).tolist()


def _synthetic_hours(bot_surge: bool) -> tuple[dict, dict]:
    """Hourly outcome counts and diversity: diurnal traffic, an optional bot surge, a diversity dip at the end."""
    hourly, diversity = {}, {}
    for i, h in enumerate(HOURS):
        n = int(2000 + 1500 * math.sin(math.pi * i / 24))
        bots = int(n * (0.35 if bot_surge and i in (14, 15) else 0.05))
        dead, late = int(n * 0.004), int(n * 0.001)
        valid = n - bots - dead - late - int(n * 0.03)
        exposures = int(valid * 0.4)
        hourly[h] = {
            "input": n,
            "valid": valid,
            "bots": bots,
            "dead_letter": dead,
            "too_late": late,
            "exposures": exposures,
            "positives": int(exposures * (0.08 + 0.02 * math.cos(i / 4))),
        }
        items = 400 if i < 21 else 60
        diversity[h] = {
            "exposure_items": items,
            "exposure_entropy": math.log2(items) - 0.6,
            "positive_items": items // 8,
            "positive_entropy": math.log2(items // 8) - 0.3,
        }
    return hourly, diversity


def _synthetic_totals(hourly: dict) -> dict:
    """The run's counts, dead letters, bot rules and labels, consistent with the hourly counts."""
    sums = {k: sum(v[k] for v in hourly.values()) for k in next(iter(hourly.values()))}
    valid, bots, dead, late, total = (sums[k] for k in ("valid", "bots", "dead_letter", "too_late", "input"))
    consent = int(total * 0.005)
    exposures, positives = sums["exposures"], sums["positives"]
    labels = int(exposures * 0.97)
    return {
        "counts": {
            "valid": valid,
            "duplicates": total - valid - bots - dead - late - consent,
            "bots": bots,
            "dead_letter": dead,
            "consent_dropped": consent,
            "too_late": late,
        },
        "input_records": total,
        "dead_letter_by_reason": {
            "malformed_json": dead // 2,
            "bad_timestamp": dead // 4,
            "missing_field": dead // 8,
            "out_of_range": dead - dead // 2 - dead // 4 - dead // 8,
        },
        "bots_by_rule": {
            "crawler_user_agent": bots // 2,
            "sustained_rate": bots // 3,
            "superhuman_click_latency": bots - bots // 2 - bots // 3,
        },
        "labels": {
            "exposures": exposures,
            "labels": labels,
            "positives": positives,
            "negatives": labels - positives,
            "orphan_outcomes": int(exposures * 0.01),
            "late_outcomes": 12,
            "coverage": labels / exposures,
        },
    }


def synthetic_stats(seed: int = 7, dwell_shift: float = 0.0, bot_surge: bool = True) -> dict:
    """A 24-hour run shaped like the real one: diurnal traffic, a bot surge, a dip in diversity at the end."""
    rng = np.random.default_rng(seed)
    hourly, diversity = _synthetic_hours(bot_surge)
    latency = np.exp(rng.normal(7.5, 1.5, 20000))
    dwell = np.exp(rng.normal(8.0 + dwell_shift, 1.0, 20000))
    return {
        **_synthetic_totals(hourly),
        "hourly": hourly,
        "latency_ms": {"arrival_minus_event": {"edges": LATENCY_EDGES, "counts": _hist(latency, LATENCY_EDGES)}},
        "ctr_by_position": {str(p): {"exposures": 5000, "positives": int(5000 * 0.25 / p**0.8)} for p in range(1, 11)},
        "diversity": diversity,
        "freshness": {
            "new": {"latest_event_time_ms": 1_793_577_000_000, "events": 1200},
            "returning": {"latest_event_time_ms": 1_793_579_900_000, "events": 40000},
        },
        "distributions": {
            "numeric": {
                "dwell_ms": {"edges": DWELL_EDGES, "counts": _hist(dwell, DWELL_EDGES)},
                "propensity": {
                    "edges": [0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
                    "counts": _hist(rng.beta(2, 5, 5000), [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]),
                },
            },
            "categorical": {
                "device_class": {"desktop": 5200, "mobile": 4100, "tablet": 600, "tv": 100},
                "event_type": {"impression": 30000, "click": 3000, "view": 2500, "skip": 900},
            },
        },
        "run_end_ms": 1_793_580_000_000,
    }


def _render(stats=None, baseline=None, mode="fail"):
    stats = stats if stats is not None else synthetic_stats()
    cfg = QualityConfig(mode=mode)
    drift = drift_report(stats, baseline) if baseline is not None else None
    summary = quality_summary(stats, cfg)
    results = evaluate_slos(stats, cfg, drift=drift, summary=summary)
    return render_report(stats, summary, results, drift=drift, title="Quality: synthetic run", mode=mode), results


def _chart_names(html: str) -> list[str]:
    return re.findall(r'<svg class="chart" data-chart="([^"]+)"', html)


def test_report_has_an_svg_per_chart_and_is_self_contained():
    html, results = _render(synthetic_stats(dwell_shift=1.0), baseline=synthetic_stats(seed=8))
    names = _chart_names(html)
    for chart in CHARTS:
        assert names.count(chart) == 1, chart
    assert "dist:dwell_ms" in names  # the drifted feature gets an overlay
    assert html.count("<svg") == len(names) >= len(CHARTS) + 1
    assert html.count("<svg") == html.count("</svg>")
    # no network: nothing to fetch, no script
    for needle in ("http:", "https:", "<script", "<link", "<img", "@import", "url("):
        assert needle not in html, needle
    # SLO table first, with pass and fail rows
    assert html.index('class="slos"') < html.index('data-chart="waterfall"')
    failed = {r["slo"] for r in results if r["ok"] is False}
    assert "drift.psi" in failed and "entropy_drop.exposure" in failed
    assert html.count('<tr class="fail">') >= len(failed) and '<tr class="pass">' in html
    assert "ingestion_success" in html and "drift.psi" in html


def test_report_renders_an_empty_run_and_warn_mode():
    empty = {
        "counts": dict.fromkeys(("valid", "duplicates", "bots", "dead_letter", "consent_dropped", "too_late"), 0),
        "input_records": 0,
        "dead_letter_by_reason": {},
        "bots_by_rule": {},
        "labels": accounting.label_summary({}),  # no exposures
        "hourly": {},
        "latency_ms": {"arrival_minus_event": {"edges": [100, 1000], "counts": [0, 0, 0]}},
        "ctr_by_position": {},
        "diversity": {},
        "freshness": {},
        "distributions": {"numeric": {}, "categorical": {}},
        "run_end_ms": None,
    }
    html, _ = _render(empty)
    assert sorted(_chart_names(html)) == sorted(CHARTS)
    assert "no data in this run" in html and "no input records" in html
    html, results = _render(synthetic_stats(), mode="warn")
    assert any(r["ok"] is False for r in results)
    assert '<tr class="warn">' in html and '<tr class="fail">' not in html and "warn mode" in html


def _png_rgb(path: Path):
    """(width, height, set of RGB tuples, fraction of non-white pixels), with Pillow when present."""
    try:
        from PIL import Image
    except ImportError:
        return _png_rgb_zlib(path)
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    flat = rgb.reshape(-1, 3)
    colours = set(map(tuple, np.unique(flat, axis=0).tolist()))
    return rgb.shape[1], rgb.shape[0], colours, float(np.mean(np.any(flat < 250, axis=1)))


def _png_rgb_zlib(path: Path):
    """Tiny PNG decoder (8-bit RGB/RGBA, not interlaced) for when Pillow is not installed."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and not interlace, (depth, ctype, interlace)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours, non_white = bytearray(stride), set(), 0
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        for x in range(0, stride, bpp):
            px = (line[x], line[x + 1], line[x + 2])
            colours.add(px)
            non_white += min(px) < 250
        prev = line
    return width, height, colours, non_white / (width * height)


def test_report_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(INSTALL_HINT)
    html, _ = _render(synthetic_stats(dwell_shift=1.0), baseline=synthetic_stats(seed=8))
    page, png = tmp_path / "report" / "quality.html", tmp_path / "shot.png"
    write_report_html(str(page), html)  # Beam FileSystems creates the folder
    assert page.read_text(encoding="utf-8") == html
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,3000",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert png.is_file() and png.stat().st_size > 10_000, (proc.returncode, proc.stderr[-2000:])
    width, height, colours, non_white = _png_rgb(png)
    assert (width, height) == (1400, 3000)
    assert len(colours) > 300, f"only {len(colours)} distinct colours: blank page?"
    assert non_white > 0.15, f"only {non_white:.1%} of the page is painted"
    for name, rgb in (
        ("SLO pass row", PASS_RGB),
        ("SLO fail row", FAIL_RGB),
        ("valid bars", VALID_RGB),
        ("bot bars", BOT_RGB),
        ("dead-letter / drifted bars", RED_RGB),
    ):
        assert rgb in colours, f"{name} colour {rgb} not in the screenshot"
