"""Signal quality: SLIs, SLO gates and drift against a baseline, as pure functions over the quality stats.

The quality stats dict is computed inside Beam (per run in batch, per window in streaming); everything
here is plain Python on that dict, so it runs on the launcher after the job and in unit tests.

Definitions (the report and the SLO gates use exactly these):

* **Ingestion success rate** = (valid + duplicates + bots + consent_dropped) / input_records.
  "Received" is every record the job read from its source (`input_records`, unparseable lines
  included). "Persisted" is every record that reached the outcome the design intends for it: valid
  events stored in `events/`, bot events stored in `bots/`, duplicates (a redelivery of an event
  that *is* stored once; the copy is logged in `duplicates/`) and consent-dropped records (the job
  correctly honoured `consent: false`). The failures are `dead_letter` (could not be processed) and
  `too_late` (arrived more than `time.lateness` after its event time, so it feeds no label or
  feature). Both are still written to `dead_letter/`: this SLI measures *usable* data, not loss. The
  numerator is the sum of the four successful outcomes, not `input - failures`, so records the
  accounting identity misses count as failures too. No input -> rate None (gate not evaluated).
* **Bot ratio** = bots / (valid + bots): the share of parsed, de-duplicated events flagged as bots
  (per rule: bots of that rule / (valid + bots)). The band has a lower bound too: a detector that
  suddenly flags nothing is as suspicious as one flagging everything.
* **Label coverage** = labels / exposures. **Orphan ratio** = orphan outcomes / exposures (the stats
  carry no total of joined outcomes; orphans per exposure is the logging-gap signal).
* **Latency percentiles** come from the `arrival_minus_event` histogram, linear within a bucket. A
  percentile in the overflow bucket is reported as the last edge (a lower bound) and flagged.
* **Entropy drop** over the last `entropy_windows` hourly windows = mean entropy of the earlier
  windows - entropy of the latest one (bits). Exposure and positive entropy are gated separately.
* **Privacy compliance rate** = PII occurrences redacted before any sink / PII occurrences found at the
  source (counters `feedback.privacy.pii_found.<field>.<kind>` and `pii_redacted.<field>.<kind>`;
  every redacted text is scanned again and what the scanner still finds counts as not redacted).
  Must be 1.0; no PII found -> 1.0. **PII at source** per field is the count of occurrences found in
  that field of the input (e-mail, phone, IP): an alertable signal of bad instrumentation.
* **PSI** uses natural logs on additively eps-smoothed, renormalised proportions
  ((p + eps) / (1 + k*eps)); 0.1 / 0.2 are the usual "watch" / "act" levels. **JS** is the
  Jensen-Shannon *divergence* in bits (in [0, 1]), not its square root. **L-infinity** is the largest
  absolute difference of proportions (TFDV's categorical drift measure).

SLO results are `{slo, value, threshold, ok, message}`; `ok` is True (met), False (breached) or None
(not evaluated: no data, or no baseline). `slo_exit_code` maps them to `EXIT_SLO_BREACH` in `fail`
mode; `warn` mode reports breaches and exits 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import Field, model_validator

from transforms import contract
from transforms.configbase import Duration, _Section

__all__ = [
    "EXIT_SLO_BREACH",
    "SUCCESS_OUTCOMES",
    "FAILURE_OUTCOMES",
    "SloConfig",
    "QualityConfig",
    "entropy_bits",
    "histogram_percentile",
    "psi",
    "js_divergence",
    "linf",
    "categorical_align",
    "quality_summary",
    "drift_report",
    "evaluate_slos",
    "slo_exit_code",
    "breaches",
    "entropy_snapshot",
    "privacy_stats",
]

EXIT_SLO_BREACH = 4  # the run finished and accounts for every record, but a quality SLO is breached

SUCCESS_OUTCOMES = (
    contract.OUTCOME_VALID,
    contract.OUTCOME_DUPLICATE,
    contract.OUTCOME_BOT,
    contract.OUTCOME_CONSENT_DROPPED,
)
FAILURE_OUTCOMES = (contract.OUTCOME_DEAD_LETTER, contract.OUTCOME_TOO_LATE)


# --- configuration ---------------------------------------------------------------------------


class SloConfig(_Section):
    """Thresholds; each one set to null disables its gate."""

    ingestion_success_min: float | None = Field(
        0.999, ge=0, le=1, description="(valid+duplicates+bots+consent_dropped) / input_records at least this."
    )
    label_coverage_min: float | None = Field(0.9, ge=0, le=1, description="labels / exposures at least this.")
    psi_max: float | None = Field(0.2, gt=0, description="Population stability index per feature vs baseline.")
    js_max: float | None = Field(0.1, gt=0, le=1, description="Jensen-Shannon divergence (bits) per feature.")
    linf_max: float | None = Field(None, gt=0, le=1, description="L-infinity distance, categorical features.")
    bot_ratio_band: tuple[float, float] | None = Field((0.0, 0.2), description="[low, high] for bots / (valid + bots).")
    entropy_drop_max: float | None = Field(
        0.5, ge=0, description="Bits the latest hour's entropy may fall below the mean of the earlier windows."
    )
    entropy_windows: int = Field(6, ge=2, description="Hourly windows the entropy trend looks at (latest included).")
    orphan_ratio_max: float | None = Field(0.05, ge=0, description="orphan outcomes / exposures at most this.")
    drift_min_count: int = Field(
        500,
        ge=1,
        description="A feature with fewer observations in either run is not compared: PSI on small "
        "samples flags noise (a same-distribution rerun of a few thousand events did).",
    )
    drift_min_share: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Categories under this share in both runs are pooled into '(other)' before "
        "comparing: long tails of rare values dominate PSI otherwise.",
    )
    latency_p99_max: Duration | None = Field(None, description="p99 of arrival - event time at most this.")
    freshness_max_age: Duration | None = Field(
        None, description="Per cohort: run end - its latest event time at most this."
    )
    privacy_compliance_min: float | None = Field(
        1.0, ge=0, le=1, description="PII redacted before any sink / PII found at the source at least this."
    )
    pii_at_source_max: int | None = Field(
        None,
        ge=0,
        description="Per input field: PII occurrences found at the source at most this "
        "(null: counts are reported, not gated).",
    )

    @model_validator(mode="after")
    def _band(self):
        if self.bot_ratio_band is not None:
            low, high = self.bot_ratio_band
            if not 0 <= low <= high <= 1:
                raise ValueError(f"bot_ratio_band must satisfy 0 <= low <= high <= 1, got {list(self.bot_ratio_band)}")
        return self


class QualityConfig(_Section):
    slos: SloConfig = SloConfig()
    mode: Literal["fail", "warn"] = Field(
        "fail", description="fail: a breached SLO exits with EXIT_SLO_BREACH; warn: reported only."
    )
    baseline: str | None = Field(None, description="baseline.json (python -m pipelines.baseline) for drift gates.")


# --- metrics on counts -----------------------------------------------------------------------


def _check_counts(counts: Iterable) -> list[float]:
    out = [float(c) for c in counts]
    for c in out:
        if not c >= 0:  # also catches NaN
            raise ValueError(f"counts must be non-negative numbers, got {c}")
    return out


def _proportions(counts: Iterable) -> list[float]:
    c = _check_counts(counts)
    total = sum(c)
    if total <= 0:
        raise ValueError("empty distribution: every count is 0")
    return [x / total for x in c]


def _aligned(p_counts, q_counts) -> tuple[list[float], list[float]]:
    p, q = _proportions(p_counts), _proportions(q_counts)
    if len(p) != len(q):
        raise ValueError(f"distributions have different numbers of bins: {len(p)} vs {len(q)}")
    return p, q


def entropy_bits(counts: Iterable[int]) -> float:
    """Shannon entropy (base 2) of the distribution the counts describe; 0.0 for no counts."""
    c = sorted(_check_counts(counts))  # sorted: the float sum must not depend on a runner's delivery order
    total = sum(c)
    if total == 0:
        return 0.0
    h = -sum((x / total) * math.log2(x / total) for x in c if x > 0)
    return h if h > 0 else 0.0


def histogram_percentile(
    edges: Sequence[float], counts: Sequence[int], q: float, lower: float | None = None
) -> float | None:
    """The q-quantile (q in [0, 1]) of a histogram, linear within the bucket it falls in.

    `edges` are ascending upper bounds; `counts` has one more entry, the overflow bucket (> last
    edge). Bucket i covers (edges[i-1], edges[i]]; the first bucket starts at `lower` (default 0, or
    the first edge when that is not positive). A quantile in the overflow bucket is returned as the
    last edge: a lower bound. None when the histogram is empty.
    """
    e = [float(x) for x in edges]
    c = _check_counts(counts)
    if not e:
        raise ValueError("a histogram needs at least one edge")
    if len(c) != len(e) + 1:
        raise ValueError(f"len(counts) must be len(edges) + 1 (overflow last): {len(c)} vs {len(e)} edges")
    if any(b <= a for a, b in zip(e, e[1:])):
        raise ValueError(f"edges must be strictly ascending: {list(edges)}")
    if not 0 <= q <= 1:
        raise ValueError(f"q is a fraction in [0, 1], got {q}")
    total = sum(c)
    if total == 0:
        return None
    if lower is None:
        lower = 0.0 if e[0] > 0 else e[0]
    target = q * total
    cum = 0.0
    for i, n in enumerate(c):
        if n == 0:
            continue
        if cum + n >= target:
            if i == len(e):
                return e[-1]
            lo = lower if i == 0 else e[i - 1]
            return lo + (target - cum) / n * (e[i] - lo)
        cum += n
    return e[-1]  # not reached: q <= 1 means the last non-empty bucket holds the target


def psi(expected_counts: Sequence[int], actual_counts: Sequence[int], eps: float = 1e-4) -> float:
    """Population stability index, sum (a - e) * ln(a / e) over aligned bins.

    Proportions are smoothed as (p + eps) / (1 + k*eps) so an empty bin does not make it infinite;
    with eps=0 a bin empty on one side only gives math.inf.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    e, a = _aligned(expected_counts, actual_counts)
    k = len(e)
    if eps:
        e = [(x + eps) / (1 + k * eps) for x in e]
        a = [(x + eps) / (1 + k * eps) for x in a]
    total = 0.0
    for pe, pa in zip(e, a):
        if pe == pa:
            continue
        if pe == 0 or pa == 0:
            return math.inf
        total += (pa - pe) * math.log(pa / pe)
    return total


def js_divergence(p_counts: Sequence[int], q_counts: Sequence[int]) -> float:
    """Jensen-Shannon divergence in bits: 0 for identical, 1 for disjoint distributions."""
    p, q = _aligned(p_counts, q_counts)
    js = 0.0
    for pi, qi in zip(p, q):
        m = (pi + qi) / 2
        if pi > 0:
            js += 0.5 * pi * math.log2(pi / m)
        if qi > 0:
            js += 0.5 * qi * math.log2(qi / m)
    return min(max(js, 0.0), 1.0)


def linf(p_counts: Sequence[int], q_counts: Sequence[int]) -> float:
    """Largest absolute difference between the two distributions' proportions."""
    p, q = _aligned(p_counts, q_counts)
    return max(abs(a - b) for a, b in zip(p, q))


def _union_keys(a: dict, b: dict) -> list:
    return sorted(set(a) | set(b), key=str)


def categorical_align(a: dict, b: dict) -> tuple[list, list]:
    """{category: n} x 2 -> two count lists over the union of categories, in sorted(str) order (0 if absent)."""
    keys = _union_keys(a, b)
    return [a.get(k, 0) for k in keys], [b.get(k, 0) for k in keys]


# --- SLIs ------------------------------------------------------------------------------------


def _ratio(num, den) -> float | None:
    return num / den if den else None


def _position_key(p: str):
    try:
        return (0, int(p), "")
    except (TypeError, ValueError):
        return (1, 0, str(p))


def entropy_drop(values: Sequence[float]) -> float | None:
    """Mean of all but the last value minus the last value (bits); None with fewer than 2 values."""
    if len(values) < 2:
        return None
    earlier = values[:-1]
    return sum(earlier) / len(earlier) - values[-1]


def entropy_snapshot(stats: dict) -> dict:
    """Mean exposure/positive entropy over the hourly windows of a run (what a baseline keeps)."""
    div = stats.get("diversity") or {}
    exp = [w.get("exposure_entropy", 0.0) for w in div.values()]
    pos = [w.get("positive_entropy", 0.0) for w in div.values()]
    return {
        "windows": len(div),
        "exposure_mean": sum(exp) / len(exp) if exp else None,
        "positive_mean": sum(pos) / len(pos) if pos else None,
    }


def quality_summary(stats: dict, cfg: QualityConfig | None = None) -> dict:
    """The SLIs of one run (or window) from its quality stats."""
    cfg = cfg or QualityConfig()
    counts = stats.get("counts", {})
    input_records = stats.get("input_records", 0)
    succeeded = sum(counts.get(o, 0) for o in SUCCESS_OUTCOMES)
    failed = {o: counts.get(o, 0) for o in FAILURE_OUTCOMES}
    sum_outcomes = sum(counts.get(o, 0) for o in contract.OUTCOMES)
    run_end = stats.get("run_end_ms")
    return {
        "input_records": input_records,
        "accounting": {"sum_of_outcomes": sum_outcomes, "holds": sum_outcomes == input_records},
        "ingestion": {
            "success_rate": _ratio(succeeded, input_records),
            "succeeded": succeeded,
            "failed": failed,
            "unaccounted": input_records - sum_outcomes,
            "definition": "(" + " + ".join(SUCCESS_OUTCOMES) + ") / input_records",
        },
        "latency_ms": _latency_summary(stats),
        "labels": _labels_summary(stats.get("labels", {})),
        "bots": _bots_summary(stats, counts),
        "freshness": _freshness_summary(stats, run_end),
        "entropy_trend": _entropy_summary(stats, cfg.slos.entropy_windows),
        "ctr_by_position": _ctr_summary(stats),
        "run_end_ms": run_end,
    }


def _latency_summary(stats: dict) -> dict:
    lat = (stats.get("latency_ms") or {}).get("arrival_minus_event") or {}
    edges, lcounts = lat.get("edges") or [], lat.get("counts") or []
    latency = {
        "count": int(sum(lcounts)),
        "overflow": lcounts[-1] if lcounts else 0,
        "max_edge": edges[-1] if edges else None,
    }
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        value = histogram_percentile(edges, lcounts, q) if edges else None
        latency[name] = value
        latency[f"{name}_in_overflow"] = bool(edges) and value is not None and _in_overflow(lcounts, q)
    return latency


def _labels_summary(labels: dict) -> dict:
    exposures = labels.get("exposures", 0)
    coverage = labels.get("coverage")
    if coverage is None and exposures:
        coverage = labels.get("labels", 0) / exposures
    return {
        "exposures": exposures,
        "labels": labels.get("labels", 0),
        "coverage": coverage,
        "positives": labels.get("positives", 0),
        "negatives": labels.get("negatives", 0),
        "orphan_outcomes": labels.get("orphan_outcomes", 0),
        "orphan_ratio": _ratio(labels.get("orphan_outcomes", 0), exposures),
        "late_outcomes": labels.get("late_outcomes", 0),
        "positive_rate": _ratio(labels.get("positives", 0), labels.get("labels", 0)),
    }


def _bots_summary(stats: dict, counts: dict) -> dict:
    human_and_bots = counts.get(contract.OUTCOME_VALID, 0) + counts.get(contract.OUTCOME_BOT, 0)
    hourly = stats.get("hourly") or {}
    return {
        "ratio": _ratio(counts.get(contract.OUTCOME_BOT, 0), human_and_bots),
        "by_rule": {rule: _ratio(n, human_and_bots) for rule, n in sorted((stats.get("bots_by_rule") or {}).items())},
        "hourly": {
            h: _ratio(v.get("bots", 0), v.get("valid", 0) + v.get("bots", 0)) for h, v in sorted(hourly.items())
        },
    }


def _freshness_summary(stats: dict, run_end: int | None) -> dict:
    freshness = {}
    for cohort, f in sorted((stats.get("freshness") or {}).items()):
        latest = f.get("latest_event_time_ms")
        freshness[cohort] = {
            "events": f.get("events", 0),
            "latest_event_time_ms": latest,
            "age_ms": run_end - latest if run_end is not None and latest is not None else None,
        }
    return freshness


def _entropy_summary(stats: dict, n_windows: int) -> dict:
    div = stats.get("diversity") or {}
    windows = sorted(div)[-n_windows:]
    exp_h = [div[w].get("exposure_entropy", 0.0) for w in windows]
    pos_h = [div[w].get("positive_entropy", 0.0) for w in windows]
    return {
        "windows": windows,
        "exposure_entropy": exp_h,
        "positive_entropy": pos_h,
        "exposure_items": [div[w].get("exposure_items", 0) for w in windows],
        "positive_items": [div[w].get("positive_items", 0) for w in windows],
        "exposure_drop": entropy_drop(exp_h),
        "positive_drop": entropy_drop(pos_h),
    }


def _ctr_summary(stats: dict) -> list[dict]:
    return [
        {
            "position": pos,
            "exposures": v.get("exposures", 0),
            "positives": v.get("positives", 0),
            "ctr": _ratio(v.get("positives", 0), v.get("exposures", 0)),
        }
        for pos, v in sorted((stats.get("ctr_by_position") or {}).items(), key=lambda kv: _position_key(kv[0]))
    ]


def _in_overflow(counts: Sequence[int], q: float) -> bool:
    below = sum(counts[:-1])
    return counts[-1] > 0 and (below < q * sum(counts) or below == 0)


# --- drift -----------------------------------------------------------------------------------


def _bucket_labels(edges: Sequence[float]) -> list[str]:
    def f(x):
        return f"{x:g}"

    if not edges:
        return ["all"]
    return [f"≤{f(edges[0])}"] + [f"({f(a)}, {f(b)}]" for a, b in zip(edges, edges[1:])] + [f">{f(edges[-1])}"]


def _same_edges(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b))


def _empty_drift_entry(kind: str) -> dict:
    """A feature's drift entry before any comparison: not comparable, no verdict."""
    return {
        "kind": kind,
        "comparable": False,
        "drifted": None,
        "flags": {},
        "psi": None,
        "js": None,
        "linf": None,
        "bins": [],
        "baseline": [],
        "current": [],
        "baseline_count": 0,
        "current_count": 0,
        "message": "",
    }


def _aligned_counts(
    kind: str, cur: dict | None, base: dict | None, slos: SloConfig
) -> tuple[dict | None, dict | None, list, list]:
    """(cur, base, baseline counts, current counts); categorical maps come back with rare values pooled."""
    if kind == "numeric":
        b_counts = list((base or {}).get("counts") or [])
        c_counts = list((cur or {}).get("counts") or [])
    else:
        if base and cur:
            base, cur = pool_rare(base, cur, slos.drift_min_share)
        b_counts, c_counts = categorical_align(base or {}, cur or {})
    return cur, base, b_counts, c_counts


def _score_drift(entry: dict, kind: str, b_counts: list, c_counts: list, slos: SloConfig) -> dict:
    """Fills in a comparable entry's distances, flags over the SLO thresholds and verdict."""
    entry.update(
        comparable=True,
        psi=psi(b_counts, c_counts),
        js=js_divergence(b_counts, c_counts),
        linf=linf(b_counts, c_counts),
        baseline=_proportions(b_counts),
        current=_proportions(c_counts),
    )
    flags = {}
    if slos.psi_max is not None:
        flags["psi"] = entry["psi"] > slos.psi_max
    if slos.js_max is not None:
        flags["js"] = entry["js"] > slos.js_max
    if slos.linf_max is not None and kind == "categorical":
        flags["linf"] = entry["linf"] > slos.linf_max
    entry["flags"] = flags
    entry["drifted"] = any(flags.values())
    over = [k for k, v in flags.items() if v]
    entry["message"] = ("drifted: " + ", ".join(over) + " over threshold") if over else "stable"
    return entry


def _feature_drift(kind: str, cur: dict | None, base: dict | None, slos: SloConfig) -> dict:
    entry = _empty_drift_entry(kind)
    cur, base, b_counts, c_counts = _aligned_counts(kind, cur, base, slos)
    entry["baseline_count"], entry["current_count"] = int(sum(b_counts)), int(sum(c_counts))
    if base is None or not sum(b_counts):
        entry["message"] = "not in the baseline (or empty there): nothing to compare"
        return entry
    if cur is None or not sum(c_counts):
        entry.update(
            drifted=True, flags={"missing": True}, message="present in the baseline but absent or empty in this run"
        )
        return entry
    if min(sum(b_counts), sum(c_counts)) < slos.drift_min_count:
        entry["message"] = (
            f"too few observations to compare ({int(sum(b_counts))} baseline, "
            f"{int(sum(c_counts))} now; drift_min_count {slos.drift_min_count})"
        )
        return entry
    if kind == "numeric":
        if not _same_edges(base.get("edges") or [], cur.get("edges") or []):
            entry["message"] = "bucket edges differ from the baseline's: snapshot a new baseline"
            return entry
        entry["bins"] = _bucket_labels(cur.get("edges") or [])
    else:
        entry["bins"] = [str(k) for k in _union_keys(base, cur)]
    if len(b_counts) != len(c_counts):
        entry["message"] = f"bin counts differ ({len(b_counts)} vs {len(c_counts)})"
        return entry
    return _score_drift(entry, kind, b_counts, c_counts, slos)


def pool_rare(a: dict, b: dict, min_share: float) -> tuple[dict, dict]:
    """Categories under `min_share` in both frequency maps merged into '(other)'."""
    ta, tb = sum(a.values()) or 1, sum(b.values()) or 1
    rare = {k for k in set(a) | set(b) if a.get(k, 0) / ta < min_share and b.get(k, 0) / tb < min_share}
    if len(rare) < 2:
        return a, b

    def pooled(d):
        out = {k: v for k, v in d.items() if k not in rare}
        out["(other)"] = out.get("(other)", 0) + sum(v for k, v in d.items() if k in rare)
        return out

    return pooled(a), pooled(b)


def drift_report(stats: dict, baseline_stats: dict, cfg: QualityConfig | None = None) -> dict:
    """Each feature's distribution in this run vs the baseline (a baseline.json or another run's stats).

    {"features": {name: {kind, comparable, psi, js, linf, flags, drifted, bins, baseline, current,
    ...}}, "drifted": [names], "thresholds": {...}, "ctr_by_position": {...}, "entropy": {...}}.
    `drifted` is True when a configured threshold is exceeded or the feature vanished, None when
    the feature cannot be compared (new, or its bucket edges changed).
    """
    slos = (cfg or QualityConfig()).slos
    cur_d = stats.get("distributions") or {}
    base_d = baseline_stats.get("distributions") or {}
    features = {}
    for kind in ("numeric", "categorical"):
        cur, base = cur_d.get(kind) or {}, base_d.get(kind) or {}
        for name in sorted(set(cur) | set(base)):
            key = name if name not in features else f"{name} ({kind})"
            features[key] = _feature_drift(kind, cur.get(name), base.get(name), slos)

    ctr = {}
    cur_ctr, base_ctr = stats.get("ctr_by_position") or {}, baseline_stats.get("ctr_by_position") or {}
    for pos in sorted(set(cur_ctr) | set(base_ctr), key=_position_key):
        c, b = cur_ctr.get(pos) or {}, base_ctr.get(pos) or {}
        c_ctr = _ratio(c.get("positives", 0), c.get("exposures", 0))
        b_ctr = _ratio(b.get("positives", 0), b.get("exposures", 0))
        ctr[pos] = {
            "current": c_ctr,
            "baseline": b_ctr,
            "diff": c_ctr - b_ctr if c_ctr is not None and b_ctr is not None else None,
        }

    cur_e = entropy_snapshot(stats)
    base_e = baseline_stats.get("entropy") if "diversity" not in baseline_stats else entropy_snapshot(baseline_stats)
    base_e = base_e or {}
    entropy = {}
    for series in ("exposure_mean", "positive_mean"):
        c, b = cur_e.get(series), base_e.get(series)
        entropy[series] = {"current": c, "baseline": b, "diff": c - b if c is not None and b is not None else None}

    return {
        "features": features,
        "drifted": [n for n, f in features.items() if f["drifted"]],
        "thresholds": {"psi_max": slos.psi_max, "js_max": slos.js_max, "linf_max": slos.linf_max},
        "ctr_by_position": ctr,
        "entropy": entropy,
    }


# --- privacy -------------------------------------------------------------------------------------

_PRIVACY_NS = "feedback.privacy."


def privacy_stats(metrics: dict) -> dict:
    """The privacy section of the quality stats from the job's counters ({"feedback.privacy.pii_found.
    <field>.<kind>": n, "feedback.privacy.pii_redacted.<field>.<kind>": n, ...})."""
    found, redacted = {}, {}
    for name, n in metrics.items():
        if not name.startswith(_PRIVACY_NS):
            continue
        what, _, rest = name[len(_PRIVACY_NS) :].partition(".")
        field, _, kind = rest.rpartition(".")
        if what == "pii_found":
            found[field] = found.get(field, {})
            found[field][kind] = found[field].get(kind, 0) + n
        elif what == "pii_redacted":
            redacted[field] = redacted.get(field, {})
            redacted[field][kind] = redacted[field].get(kind, 0) + n
    total_found = sum(sum(k.values()) for k in found.values())
    total_redacted = sum(sum(k.values()) for k in redacted.values())
    by_kind: dict = {}
    for kinds in found.values():
        for kind, n in kinds.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    return {
        "found": total_found,
        "redacted": total_redacted,
        "not_redacted": total_found - total_redacted,
        "compliance_rate": 1.0 if not total_found else total_redacted / total_found,
        "found_by_field": {f: sum(k.values()) for f, k in sorted(found.items())},
        "found_by_kind": dict(sorted(by_kind.items())),
        "found_by_field_kind": {f: dict(sorted(k.items())) for f, k in sorted(found.items())},
    }


# --- SLO evaluation --------------------------------------------------------------------------


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    if pct:
        return f"{100 * v:.3f}%" if 0.99 <= v < 1 else f"{100 * v:.4g}%"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class _Rows:
    def __init__(self, mode: str):
        self.mode, self.rows = mode, []

    def add(self, slo, value, threshold, ok, message):
        if ok is False:
            message = f"BREACH: {message}" + (
                " (warn mode: reported, the job does not fail)" if self.mode == "warn" else ""
            )
        elif ok is None:
            message = f"not evaluated: {message}"
        self.rows.append({"slo": slo, "value": value, "threshold": threshold, "ok": ok, "message": message})


# --- SLO table ----------------------------------------------------------------------------------
# Each check: (summary, stats, drift, threshold) -> (slo, value, threshold, ok, message) rows.
# ok None = not evaluated (no data), which `_Rows.add` reports as such.


def _judge(name, value, t, ok, message, empty):
    """The common shape: no value -> not evaluated with `empty`; else `ok(value)` and `message(value)`."""
    if value is None:
        return (name, None, t, None, empty)
    return (name, value, t, ok(value), message(value))


def _check_ingestion(s, stats, drift, t):
    ing = s["ingestion"]
    failed = ", ".join(f"{k} {v}" for k, v in ing["failed"].items())
    unaccounted = f", unaccounted {ing['unaccounted']}" if ing["unaccounted"] else ""
    yield _judge(
        "ingestion_success",
        ing["success_rate"],
        t,
        lambda v: v >= t,
        lambda v: (
            f"{_fmt(v, True)} of {s['input_records']} records persisted (min {_fmt(t, True)}; {failed}{unaccounted})"
        ),
        "no input records",
    )


def _check_label_coverage(s, stats, drift, t):
    lab = s["labels"]
    yield _judge(
        "label_coverage",
        lab["coverage"],
        t,
        lambda v: v >= t,
        lambda v: f"{lab['labels']} labels for {lab['exposures']} exposures = {_fmt(v, True)} (min {_fmt(t, True)})",
        "no exposures",
    )


def _check_orphan_ratio(s, stats, drift, t):
    ratio, orphans = s["labels"]["orphan_ratio"], s["labels"]["orphan_outcomes"]
    if ratio is None and orphans:
        yield ("orphan_ratio", None, t, False, f"{orphans} orphan outcomes and no exposures at all")
        return
    yield _judge(
        "orphan_ratio",
        ratio,
        t,
        lambda v: v <= t,
        lambda v: (
            f"{orphans} orphan outcomes per {s['labels']['exposures']} exposures = {_fmt(v, True)} "
            f"(max {_fmt(t, True)})"
        ),
        "no exposures",
    )


def _check_bot_ratio(s, stats, drift, band):
    low, high = band
    rules = ", ".join(f"{r} {_fmt(v, True)}" for r, v in s["bots"]["by_rule"].items()) or "no rule fired"
    yield _judge(
        "bot_ratio",
        s["bots"]["ratio"],
        [low, high],
        lambda v: low <= v <= high,
        lambda v: f"bots / (valid + bots) = {_fmt(v, True)}, band [{_fmt(low, True)}, {_fmt(high, True)}] ({rules})",
        "no valid or bot events",
    )


def _check_entropy_drop(s, stats, drift, t):
    trend = s["entropy_trend"]
    for series in ("exposure", "positive"):
        yield _judge(
            f"entropy_drop.{series}",
            trend[f"{series}_drop"],
            t,
            lambda v: v <= t,
            lambda v, series=series: (
                f"latest hour {trend['windows'][-1]}: {trend[f'{series}_entropy'][-1]:.3f} bits, "
                f"{v:+.3f} below the mean of the previous {len(trend['windows']) - 1} (max drop {t:g})"
            ),
            f"fewer than 2 hourly windows (have {len(trend['windows'])})",
        )


def _check_latency_p99(s, stats, drift, t):
    lat, t_ms = s["latency_ms"], t * 1000
    p99 = lat["p99"]
    if p99 is not None and lat["p99_in_overflow"] and p99 <= t_ms:
        yield (
            "latency_p99",
            p99,
            t_ms,
            False,
            f"p99 is beyond the last bucket edge ({p99:g} ms): cannot show it is under {t_ms:g} ms",
        )
        return
    yield _judge(
        "latency_p99",
        p99,
        t_ms,
        lambda v: v <= t_ms,
        lambda v: f"p99 arrival - event time {v:.0f} ms (max {t_ms:g} ms)",
        "empty latency histogram",
    )


def _check_freshness(s, stats, drift, t):
    t_ms = t * 1000
    for cohort, f in s["freshness"].items():
        yield _judge(
            f"freshness.{cohort}",
            f["age_ms"],
            t_ms,
            lambda v: v <= t_ms,
            lambda v, cohort=cohort: f"latest {cohort} event {v / 1000:g} s before the run end (max {t_ms / 1000:g} s)",
            "no events in this cohort",
        )


# Privacy gates need the job's counters (batch: after the run); stats without them give no row.
def _check_privacy_compliance(s, stats, drift, t):
    privacy = stats.get("privacy")
    if privacy is not None:
        rate = privacy["compliance_rate"]
        yield (
            (
                "privacy_compliance",
                rate,
                t,
                rate >= t,
                f"{privacy['redacted']} of {privacy['found']} PII occurrences found at the source redacted "
                f"before any sink = {_fmt(rate, True)} (min {_fmt(t, True)})",
            )
        )


def _check_pii_at_source(s, stats, drift, t):
    privacy = stats.get("privacy")
    for field, n in (privacy["found_by_field"] if privacy is not None else {}).items():
        kinds = ", ".join(f"{k} {v}" for k, v in privacy["found_by_field_kind"][field].items())
        yield (
            f"pii_at_source.{field}",
            n,
            t,
            n <= t,
            f"{n} PII occurrences in {field} at the source ({kinds}; max {t})",
        )


def _check_drift(metric):
    def check(s, stats, drift, t):
        name = f"drift.{metric}"
        if drift is None:
            yield (name, None, t, None, "no baseline given")
            return
        scored = {
            n: f[metric]
            for n, f in drift["features"].items()
            if f["comparable"] and f[metric] is not None and (metric != "linf" or f["kind"] == "categorical")
        }
        if not scored:
            yield (name, None, t, None, "no feature comparable with the baseline")
            return
        worst = max(scored, key=scored.get)
        over = sorted(n for n, v in scored.items() if v > t)
        yield (
            name,
            scored[worst],
            t,
            not over,
            (
                f"{len(over)} of {len(scored)} features over {t:g}: {', '.join(over)}"
                if over
                else f"{len(scored)} features, worst {worst} {scored[worst]:.4f} (max {t:g})"
            ),
        )

    return check


def _check_missing_features(s, stats, drift, t):
    if drift is not None:
        missing = sorted(n for n, f in drift["features"].items() if f["flags"].get("missing"))
        yield (
            "drift.missing_features",
            len(missing),
            t,
            not missing,
            f"absent from this run but in the baseline: {', '.join(missing)}"
            if missing
            else "every baseline feature is present",
        )


def _any_drift_gate(slo) -> int | None:
    """Missing baseline features are checked (threshold 0) whenever any drift gate is on."""
    return 0 if any(t is not None for t in (slo.psi_max, slo.js_max, slo.linf_max)) else None


# (threshold: SloConfig -> value or None = gate disabled, check) in report order.
_SLO_TABLE = (
    (lambda slo: slo.ingestion_success_min, _check_ingestion),
    (lambda slo: slo.label_coverage_min, _check_label_coverage),
    (lambda slo: slo.orphan_ratio_max, _check_orphan_ratio),
    (lambda slo: slo.bot_ratio_band, _check_bot_ratio),
    (lambda slo: slo.entropy_drop_max, _check_entropy_drop),
    (lambda slo: slo.latency_p99_max, _check_latency_p99),
    (lambda slo: slo.freshness_max_age, _check_freshness),
    (lambda slo: slo.privacy_compliance_min, _check_privacy_compliance),
    (lambda slo: slo.pii_at_source_max, _check_pii_at_source),
    (lambda slo: slo.psi_max, _check_drift("psi")),
    (lambda slo: slo.js_max, _check_drift("js")),
    (lambda slo: slo.linf_max, _check_drift("linf")),
    (_any_drift_gate, _check_missing_features),
)


def evaluate_slos(
    stats: dict, cfg: QualityConfig | None = None, drift: dict | None = None, summary: dict | None = None
) -> list[dict]:
    """Every enabled gate -> {slo, value, threshold, ok, message}; disabled gates give no row."""
    cfg = cfg or QualityConfig()
    s = summary or quality_summary(stats, cfg)
    out = _Rows(cfg.mode)
    for threshold, check in _SLO_TABLE:
        t = threshold(cfg.slos)
        if t is not None:
            for row in check(s, stats, drift, t):
                out.add(*row)
    return out.rows


def breaches(results: Iterable[dict]) -> list[dict]:
    return [r for r in results if r["ok"] is False]


def slo_exit_code(results: Iterable[dict], cfg: QualityConfig | None = None) -> int:
    """EXIT_SLO_BREACH when a gate is breached and the mode is `fail`; 0 otherwise (warn mode included)."""
    cfg = cfg or QualityConfig()
    return EXIT_SLO_BREACH if cfg.mode == "fail" and breaches(results) else 0
