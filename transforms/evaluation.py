"""Counterfactual evaluation, experiment readouts and feedback-loop figures, as pure functions.

Everything here is plain Python / numpy on small aggregated arrays; `pipelines/evaluate.py` is the
thin Beam job that builds those arrays from the labels and slates.

Off-policy estimation (one exposure = one round, as in obp): for exposure i with logged item a_i at
position k_i, reward r_i and logged propensity p_i, the target policy gives pi(a_i | x_i, k_i) and
the importance weight is w_i = min(pi / p_i, clip).
    IPS   = sum_i w_i r_i / n
    SNIPS = sum_i w_i r_i / sum_i w_i
    DM    = sum_i qhat(x_i, pi) / n,        qhat(x, pi) = sum_a pi(a | x, k) qhat(x, a, k)
    DR    = sum_i [qhat(x_i, pi) + w_i (r_i - qhat(x_i, a_i, k_i))] / n
ESS = (sum w)^2 / sum w^2. Bootstrap intervals resample *requests* (the exposures of one request are
not independent), so the job keeps one small row of sums per request: O(requests) memory on one
worker (about 80 bytes a request: 10 M requests ~ 0.8 GB), fine at this project's scale. The
resampling draws `RandomState(seed).choice(n_requests, n_requests)` per replicate, the same stream
obp's `estimate_confidence_interval_by_bootstrap` draws, so with one exposure per request the
IPS / DM / DR intervals equal obp's for the same seed (SNIPS is re-computed as a ratio per
replicate, which obp does not do).

Chi-square tail probabilities use the regularised upper incomplete gamma function written out below
(scipy is not a dependency of this project; the series / continued fraction are the textbook ones).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Sequence
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from transforms.configbase import Duration, _Section

__all__ = [
    "OpeConfig",
    "ExperimentConfig",
    "ExperimentsConfig",
    "ColdStartConfig",
    "PositionBiasConfig",
    "EvaluationConfig",
    "PolicyTables",
    "load_policy_tables",
    "exclusion_reason",
    "exposure_terms",
    "request_sums",
    "ope_estimates",
    "chi2_sf",
    "srm_check",
    "ratio_stats",
    "experiment_readout",
    "gini",
    "top_share",
    "cold_start_buckets",
    "position_curve_randomised",
    "position_curve_em",
    "position_weights_table",
    "evaluation_slos",
    "is_randomised_slate",
]

BUILTIN_POLICIES = ("uniform", "logged")
CLICK = "click"


# --- configuration ---------------------------------------------------------------------------


class OpeConfig(_Section):
    target_policy: str = Field(
        "logged",
        description="'uniform', 'logged' or a JSON/JSONL file of {item_id, probability[, position]"
        "[, request_id | context]} rows (relative to the config file).",
    )
    reward: Literal["click", "weighted"] = Field(
        "click", description="click: the label (0/1); weighted: label x weight (purchase 5, add_to_cart 3, ...)."
    )
    reward_model: str | None = Field(
        None,
        description="JSON/JSONL file of {item_id, reward[, position][, request_id | context]} rows: the "
        "reward model table for the direct method and doubly robust.",
    )
    default_reward: float = Field(0.0, description="qhat of an item the reward table does not list.")
    context_fields: tuple[str, ...] = Field(
        (), description="Label fields whose values form the context key of `context` rows, e.g. [device_class]."
    )
    n_actions: int | None = Field(None, ge=1, description="Size of the action set (catalogue); needed by 'uniform'.")
    clip: float | None = Field(None, gt=0, description="Importance weights are capped at this (null: no clipping).")
    bootstrap_samples: int = Field(1000, ge=0, description="Bootstrap replicates (0: no intervals).")
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(12345, description="Bootstrap seed: the same inputs give the same intervals.")
    min_ess_share: float | None = Field(
        None, ge=0, le=1, description="SLO: effective sample size / exposures at least this (null: off)."
    )
    max_excluded_share: float | None = Field(
        0.1,
        ge=0,
        le=1,
        description="SLO: share of the labels read that OPE cannot use (no_propensity, invalid_propensity, "
        "no_target_policy) at most this (null: off). Nothing evaluable always fails the gate.",
    )

    @model_validator(mode="after")
    def _uniform_needs_actions(self):
        if self.target_policy == "uniform" and self.n_actions is None:
            raise ValueError("target_policy 'uniform' needs n_actions (the number of items it chooses from)")
        return self


class ExperimentConfig(_Section):
    split: dict[str, float] = Field(..., description="Configured traffic split, e.g. {control: 0.5, treatment: 0.5}.")
    control: str | None = Field(None, description="Control variant (default: experiments.control).")

    @field_validator("split")
    @classmethod
    def _shares(cls, v):
        if len(v) < 2:
            raise ValueError("a split needs at least two variants")
        if any(s <= 0 for s in v.values()):
            raise ValueError("every share must be > 0")
        if not math.isclose(sum(v.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"shares must sum to 1, they sum to {sum(v.values()):g}")
        return v


class ExperimentsConfig(_Section):
    control: str = Field("control", description="Name of the control variant (each experiment may override it).")
    unit: Literal["user", "request"] = Field(
        "user", description="Randomisation unit: the SRM check counts these and the delta method clusters on them."
    )
    conversion_types: tuple[str, ...] = Field(("purchase",), description="Outcome types that count as a conversion.")
    srm_alpha: float | None = Field(
        0.001, gt=0, lt=1, description="SLO: the SRM chi-square p-value below this fails the gate (null: off)."
    )
    confidence: float = Field(0.95, gt=0, lt=1)
    experiments: dict[str, ExperimentConfig] = Field(default_factory=dict, description="Per experiment_id.")

    @model_validator(mode="after")
    def _control_in_split(self):
        # a split without its control variant has nothing to compare against: the readout would be empty
        for exp_id, exp in self.experiments.items():
            control = exp.control or self.control
            if control not in exp.split:
                raise ValueError(
                    f"evaluation.experiments.experiments.{exp_id}.split has no control variant {control!r} "
                    f"(variants {sorted(exp.split)}); add it to the split or set "
                    f"evaluation.experiments.experiments.{exp_id}.control"
                )
        return self


class ColdStartConfig(_Section):
    new_item_age: Duration = Field(7 * 86400.0, description="An item first seen this recently is new.")
    bucket: Duration = Field(86400.0, description="Time buckets of the trend (by impression time).")
    new_exposure_share_min: float | None = Field(
        None, ge=0, le=1, description="SLO: share of exposures going to new items at least this (null: off)."
    )
    gini_max: float | None = Field(None, ge=0, le=1, description="SLO: item-exposure Gini per bucket at most this.")
    top1pct_share_max: float | None = Field(
        None, ge=0, le=1, description="SLO: exposure share of the top 1% of items per bucket at most this."
    )

    @model_validator(mode="after")
    def _positive(self):
        if self.bucket <= 0 or self.new_item_age <= 0:
            raise ValueError("bucket and new_item_age must be > 0")
        return self


class PositionBiasConfig(_Section):
    method: Literal["auto", "randomised", "em"] = Field(
        "auto", description="auto: randomised traffic when there is enough of it, else the EM click model."
    )
    randomised_policies: tuple[str, ...] = Field(
        (),
        description="Policies known to place items uniformly at random (besides slates whose propensities "
        "are all 1/n_items).",
    )
    min_randomised_exposures: int = Field(1000, ge=1)
    max_position: int = Field(20, ge=1, description="Positions beyond this share its estimate.")
    max_weight: float = Field(20.0, ge=1, description="Inverse-propensity weights are capped at this.")
    em_iterations: int = Field(
        5000, ge=1, description="EM cap; a fit that reaches it without converging fails the gate."
    )
    em_tolerance: float = Field(1e-9, gt=0, description="EM stops when no parameter moves more than this.")
    em_min_item_exposures: int = Field(
        50,
        ge=1,
        description="Items with fewer exposures share one pooled relevance in the EM (per-item relevance "
        "fitted on one or two exposures overfits and drags the curve up).",
    )


class EvaluationConfig(_Section):
    ope: OpeConfig = OpeConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    position_bias: PositionBiasConfig = PositionBiasConfig()


# --- target policy and reward tables ---------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    """A local path or any URL Beam's FileSystems reads (gs://, s3://, ...)."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as f:
            return f.read()
    except Exception as e:  # Beam wraps the filesystem's own errors in several types
        raise OSError(2, str(e)) from None


def _read_rows(path: str, what: str) -> list[tuple[str, dict]]:
    """(where, row) pairs: where is 'line N' in a JSON-lines file, 'row N' in a JSON array."""
    try:
        text = _read_bytes(path).decode("utf-8")
    except OSError as e:
        raise ValueError(
            f"{what} {path}: cannot read it ({e.strerror}); name an existing JSON/JSONL file"
            + (" or a built-in (uniform, logged)" if what == "target policy" else "")
        ) from None
    stripped = text.lstrip()
    lines = None
    try:
        if stripped.startswith("["):
            rows = json.loads(text)
        elif stripped.startswith("{") and "\n" not in stripped.strip():
            rows = [json.loads(text)]
        else:
            numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
            rows = [json.loads(line) for _, line in numbered]
            lines = [n for n, _ in numbered]
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: not JSON or JSON lines: {e}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{what} {path}: every row must be an object")
    return [(f"line {lines[i]}" if lines else f"row {i}", r) for i, r in enumerate(rows)]


def _scope(row: dict, context_fields: Sequence[str], what: str, where: str) -> tuple:
    """(kind, key, position) of a table row: kind 'request', 'context' or 'all'."""
    pos = row.get("position")
    if pos is not None and (not isinstance(pos, int) or isinstance(pos, bool)):
        raise ValueError(f"{what} {where}: position must be an integer, got {pos!r}")
    if row.get("request_id") is not None:
        return ("request", str(row["request_id"]), pos)
    if row.get("context") is not None:
        ctx = row["context"]
        if not isinstance(ctx, dict) or set(ctx) != set(context_fields):
            raise ValueError(
                f"{what} {where}: context must name exactly the fields {list(context_fields)} "
                f"(evaluation.ope.context_fields), got {ctx!r}"
            )
        return ("context", tuple(str(ctx[f]) if ctx[f] is not None else None for f in context_fields), pos)
    return ("all", None, pos)


class PolicyTables:
    """The target policy and reward model, resolved on the launcher and shipped to workers by value.

    Lookup for an exposure goes from the most to the least specific scope: (request, position),
    (request), (context, position), (context), (position), (everything). The first scope the table
    has defines the whole distribution there (items it does not list have probability 0).
    """

    def __init__(
        self,
        target: str,
        policy: dict | None,
        rewards: dict | None,
        context_fields: Sequence[str],
        n_actions: int | None,
        default_reward: float,
    ):
        self.target = target
        self.policy = policy  # scope -> {item: probability}
        self.rewards = rewards  # scope -> {item: qhat}
        self.context_fields = tuple(context_fields)
        self.n_actions = n_actions
        self.default_reward = default_reward

    def _scopes(self, label: dict):
        rid = label.get("request_id")
        pos = label.get("position")
        ctx = tuple(None if label.get(f) is None else str(label.get(f)) for f in self.context_fields)
        out = []
        if rid is not None:
            out += [("request", str(rid), pos), ("request", str(rid), None)]
        if self.context_fields:
            out += [("context", ctx, pos), ("context", ctx, None)]
        return out + [("all", None, pos), ("all", None, None)]

    def distribution(self, label: dict) -> dict | None:
        for s in self._scopes(label):
            if s in self.policy:
                return self.policy[s]
        return None

    def qhat(self, label: dict, item: str) -> float:
        if not self.rewards:
            return self.default_reward
        for s in self._scopes(label):
            table = self.rewards.get(s)
            if table is not None and item in table:
                return table[item]
        return self.default_reward

    def qhat_items(self, label: dict) -> dict:
        """item -> qhat for every item some matching scope lists (most specific wins)."""
        out: dict = {}
        for s in reversed(self._scopes(label)):
            out.update((self.rewards or {}).get(s, {}))
        return out


def _table(rows: list[tuple[str, dict]], value_key: str, context_fields, what: str) -> dict:
    table: dict = {}
    for where, r in rows:
        if r.get("item_id") is None:
            raise ValueError(f"{what} {where}: item_id is missing")
        v = r.get(value_key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{what} {where}: {value_key} must be a finite number, got {v!r}")
        dist = table.setdefault(_scope(r, context_fields, what, where), {})
        if str(r["item_id"]) in dist:
            # a later row silently replacing an earlier one hides an error in the file (and passes the sum check)
            raise ValueError(
                f"{what} {where}: item {r['item_id']!r} is listed twice in "
                "the same scope (request_id / context / position); keep one row per item and scope"
            )
        dist[str(r["item_id"])] = float(v)
    return table


def load_policy_tables(cfg: OpeConfig, resolve=lambda p: p) -> PolicyTables:
    """Reads the target policy and reward files named in the config (launcher side). ValueError with
    the file, row and reason on bad content: probabilities outside [0, 1] or not summing to 1."""
    policy = None
    if cfg.target_policy not in BUILTIN_POLICIES:
        path = resolve(cfg.target_policy)
        policy = _table(_read_rows(path, "target policy"), "probability", cfg.context_fields, f"target policy {path}")
        for scope, dist in policy.items():
            bad = [a for a, p in dist.items() if not 0 <= p <= 1]
            if bad:
                raise ValueError(f"target policy {path}: probabilities outside [0, 1] for items {bad[:5]} in {scope}")
            total = math.fsum(dist.values())
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"target policy {path}: probabilities in scope {scope} sum to {total:.9g}, not 1")
    rewards = None
    if cfg.reward_model:
        path = resolve(cfg.reward_model)
        rewards = _table(_read_rows(path, "reward model"), "reward", cfg.context_fields, f"reward model {path}")
    return PolicyTables(cfg.target_policy, policy, rewards, cfg.context_fields, cfg.n_actions, cfg.default_reward)


def label_reward(label: dict, kind: str) -> float:
    return float(label["label"]) * (float(label["weight"]) if kind == "weighted" else 1.0)


NO_PROPENSITY = "no_propensity"
INVALID_PROPENSITY = "invalid_propensity"
NO_TARGET_POLICY = "no_target_policy"
EXCLUSION_REASONS = (NO_PROPENSITY, INVALID_PROPENSITY, NO_TARGET_POLICY)


def exclusion_reason(label: dict, tables: PolicyTables) -> str | None:
    """Why OPE cannot use this exposure, or None. A target-policy file that has no row for the
    exposure's request, context or position does not say what the policy would do there: the
    exposure is not evaluable (excluded), rather than given target probability 0."""
    p = label.get("propensity")
    if p is None or p == 0:
        return NO_PROPENSITY
    if not (0 < p <= 1):  # > 1, negative or NaN: a logging bug, not a missing value
        return INVALID_PROPENSITY
    if tables.policy is not None and tables.distribution(label) is None:
        return NO_TARGET_POLICY
    return None


def exposure_terms(label: dict, tables: PolicyTables, reward_kind: str, clip: float | None) -> dict | None:
    """One exposure -> {r, w_raw, w, q_factual, q_target}; None when it is excluded (exclusion_reason)."""
    if exclusion_reason(label, tables) is not None:
        return None
    p = label["propensity"]
    item = label["item_id"]
    r = label_reward(label, reward_kind)
    q_factual = tables.qhat(label, item)
    if tables.target == "logged":
        pi, q_target = p, q_factual  # pi_e = pi_b: w = 1; E_pi_b[qhat] taken at the logged action
    elif tables.target == "uniform":
        pi = 1.0 / tables.n_actions
        listed = tables.qhat_items(label)
        q_target = (
            math.fsum(listed.values()) + (tables.n_actions - len(listed)) * tables.default_reward
        ) / tables.n_actions
    else:
        dist = tables.distribution(label)
        pi = dist.get(item, 0.0)  # the policy covers this request / context but never shows this item
        weight_sum = math.fsum(dist.values())
        q_target = (
            math.fsum(prob * tables.qhat(label, a) for a, prob in dist.items()) / weight_sum if weight_sum > 0 else 0.0
        )
    w_raw = pi / p
    w = min(w_raw, clip) if clip is not None else w_raw
    return {"r": r, "w_raw": w_raw, "w": w, "q_factual": q_factual, "q_target": q_target}


REQUEST_COLUMNS = ("n", "r", "w", "w2", "wr", "dm", "dr", "w_raw_max", "clipped")


def request_sums(terms: Iterable[dict]) -> tuple:
    """The exposures of one request -> one row of sums, in REQUEST_COLUMNS order."""
    n = r = w = w2 = wr = dm = dr = 0.0
    w_max, clipped = 0.0, 0
    for t in terms:
        n += 1
        r += t["r"]
        w += t["w"]
        w2 += t["w"] * t["w"]
        wr += t["w"] * t["r"]
        dm += t["q_target"]
        dr += t["q_target"] + t["w"] * (t["r"] - t["q_factual"])
        w_max = max(w_max, t["w_raw"])
        clipped += t["w"] < t["w_raw"]
    return (n, r, w, w2, wr, dm, dr, w_max, clipped)


def _estimates(s: np.ndarray) -> dict:
    n, w, wr, dm, dr = s[0], s[2], s[4], s[5], s[6]
    return {"ips": wr / n, "snips": wr / w if w > 0 else float("nan"), "dm": dm / n, "dr": dr / n}


def ope_estimates(
    rows: Sequence[tuple],
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 12345,
    has_reward_model: bool = False,
) -> dict:
    """Per-request rows (sorted by request id) -> estimates, bootstrap intervals and weight diagnostics."""
    if not rows:
        return {"exposures": 0, "requests": 0, "estimates": {}, "diagnostics": {}}
    a = np.asarray(rows, dtype=float)
    cols = [0, 1, 2, 3, 4, 5, 6]
    sums = a[:, cols].sum(axis=0)
    n, w, w2 = sums[0], sums[2], sums[3]
    point = {m: (None if math.isnan(v) else float(v)) for m, v in _estimates(sums).items()}
    methods = ["ips", "snips", "dm", "dr"] if has_reward_model else ["ips", "snips"]
    out = {
        "exposures": int(n),
        "requests": len(rows),
        "on_policy_mean": sums[1] / n,
        "estimates": {m: {"value": point[m]} for m in methods},
    }
    if bootstrap_samples:
        rs = np.random.RandomState(seed)
        reps = {m: np.empty(bootstrap_samples) for m in methods}
        data = a[:, cols]
        k = len(rows)
        for b in range(bootstrap_samples):
            idx = rs.choice(k, size=k)
            est = _estimates(np.bincount(idx, minlength=k) @ data)
            for m in methods:
                reps[m][b] = est[m]
        alpha = 1 - confidence
        for m in methods:
            if np.isnan(reps[m]).all():  # SNIPS with every weight 0
                out["estimates"][m].update(ci_low=None, ci_high=None, bootstrap_mean=None)
                continue
            lo, hi = np.nanpercentile(reps[m], [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out["estimates"][m].update(ci_low=float(lo), ci_high=float(hi), bootstrap_mean=float(np.nanmean(reps[m])))
        out["bootstrap"] = {"samples": bootstrap_samples, "confidence": confidence, "seed": seed, "unit": "request"}
    out["diagnostics"] = {
        "ess": float(w * w / w2) if w2 > 0 else 0.0,
        "ess_share": float(w * w / w2 / n) if w2 > 0 else 0.0,
        "max_weight": float(a[:, 7].max()),
        "mean_weight": float(w / n),
        "clipped_exposures": int(a[:, 8].sum()),
    }
    return out


# --- chi-square ------------------------------------------------------------------------------


def _gamma_q(s: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(s, x)."""
    if x <= 0:
        return 1.0
    lg = math.lgamma(s)
    if x < s + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / s
        ap = s
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(-x + s * math.log(x) - lg))
    # Lentz's continued fraction for Q
    tiny = 1e-300
    b = x + 1 - s
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - s)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return math.exp(-x + s * math.log(x) - lg) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _gamma_q(df / 2.0, x / 2.0)


def srm_check(counts: dict, split: dict, alpha: float | None) -> dict:
    """Sample-ratio mismatch: observed units per variant vs the configured split (Pearson chi-square)."""
    unexpected = sorted(set(counts) - set(split))
    total = sum(counts.get(v, 0) for v in split)
    rows = {
        v: {
            "observed": counts.get(v, 0),
            "expected": total * share,
            "share": share,
            "observed_share": counts.get(v, 0) / total if total else None,
        }
        for v, share in split.items()
    }
    chi2 = p = ok = None  # no units: nothing to test
    if total:
        chi2 = math.fsum((r["observed"] - r["expected"]) ** 2 / r["expected"] for r in rows.values())
        p = chi2_sf(chi2, len(split) - 1)
        ok = None if alpha is None else (p >= alpha and not unexpected)
    return {
        "variants": rows,
        "chi2": chi2,
        "df": len(split) - 1,
        "p_value": p,
        "unexpected": unexpected,
        "ok": ok,
        "alpha": alpha,
    }


# --- experiment readout (delta method) -------------------------------------------------------

EXPERIMENT_METRICS = ("ctr", "conversion", "value")
# per-unit sums kept for the delta method: y = exposures, x = the metric's numerator
UNIT_FIELDS = ("exposures", "clicks", "conversions", "value")


def ratio_stats(acc: dict, metric_field: str) -> dict:
    """Ratio metric sum(x) / sum(y) over units with its delta-method variance.

    acc holds n (units), sy, syy and per metric sx, sxx, sxy (sums over units). Sample (co)variances
    use n - 1. var(R) = (s_xx - 2 R s_xy + R^2 s_yy) / (n mean_y^2), the first-order Taylor
    expansion of mean_x / mean_y (Deng et al., 'Applying the delta method in metric analytics').
    """
    n = acc["n"]
    sy, syy = acc["sy"], acc["syy"]
    sx, sxx, sxy = acc[f"{metric_field}_sx"], acc[f"{metric_field}_sxx"], acc[f"{metric_field}_sxy"]
    if n == 0 or sy == 0:
        return {"value": None, "variance": None}
    mx, my = sx / n, sy / n
    r = sx / sy
    if n < 2:
        return {"value": r, "variance": None}
    vx = (sxx - n * mx * mx) / (n - 1)
    vy = (syy - n * my * my) / (n - 1)
    cxy = (sxy - n * mx * my) / (n - 1)
    var = (vx - 2 * r * cxy + r * r * vy) / (n * my * my)
    return {"value": r, "variance": max(var, 0.0)}


def unit_accumulator(units: Iterable[dict]) -> dict:
    """Plain sums over units of {exposures, clicks, conversions, value} (what the CombineFn builds)."""
    acc = {"n": 0, "sy": 0.0, "syy": 0.0}
    for m in UNIT_FIELDS[1:]:
        acc.update({f"{m}_sx": 0.0, f"{m}_sxx": 0.0, f"{m}_sxy": 0.0})
    for u in units:
        add_unit(acc, u)
    return acc


def add_unit(acc: dict, u: dict) -> dict:
    y = u["exposures"]
    acc["n"] += 1
    acc["sy"] += y
    acc["syy"] += y * y
    for m in UNIT_FIELDS[1:]:
        x = u[m]
        acc[f"{m}_sx"] += x
        acc[f"{m}_sxx"] += x * x
        acc[f"{m}_sxy"] += x * y
    return acc


def merge_accumulators(accs: Iterable[dict]) -> dict:
    out = unit_accumulator(())
    for a in accs:
        for k, v in a.items():
            out[k] += v
    return out


_METRIC_FIELD = {"ctr": "clicks", "conversion": "conversions", "value": "value"}


def experiment_readout(experiment_id: str, by_variant: dict, cfg: ExperimentsConfig) -> dict:
    """One experiment: per variant exposures and metrics; difference vs control with delta-method CIs; SRM."""
    exp_cfg = cfg.experiments.get(experiment_id)
    control = (exp_cfg.control if exp_cfg and exp_cfg.control else None) or cfg.control
    z = NormalDist().inv_cdf(1 - (1 - cfg.confidence) / 2)
    variants = {}
    for v, acc in sorted(by_variant.items()):
        row = {"units": acc["n"], "exposures": int(acc["sy"])}
        for m in EXPERIMENT_METRICS:
            row[m] = ratio_stats(acc, _METRIC_FIELD[m])
        variants[v] = row
    ctl = variants.get(control)
    for v, row in variants.items():
        if v == control or ctl is None:
            continue
        row["vs_control"] = {}
        for m in EXPERIMENT_METRICS:
            t, c = row[m], ctl[m]
            if t["value"] is None or c["value"] is None or t["variance"] is None or c["variance"] is None:
                row["vs_control"][m] = {"diff": None, "ci_low": None, "ci_high": None, "relative": None}
                continue
            diff = t["value"] - c["value"]
            se = math.sqrt(t["variance"] + c["variance"])
            row["vs_control"][m] = {
                "diff": diff,
                "se": se,
                "ci_low": diff - z * se,
                "ci_high": diff + z * se,
                "relative": diff / c["value"] if c["value"] else None,
                "significant": not (diff - z * se <= 0 <= diff + z * se),
            }
    srm = None
    if exp_cfg is not None:
        srm = srm_check({v: acc["n"] for v, acc in by_variant.items()}, exp_cfg.split, cfg.srm_alpha)
    return {
        "experiment_id": experiment_id,
        "control": control,
        "control_present": ctl is not None,
        "unit": cfg.unit,
        "confidence": cfg.confidence,
        "variants": variants,
        "srm": srm,
    }


# --- cold start and concentration ------------------------------------------------------------


def gini(counts: Sequence[float]) -> float | None:
    """Gini coefficient of non-negative counts (0: equal; near 1: all on one item). None when empty."""
    x = np.sort(np.asarray(counts, dtype=float))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return None
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * x) / (n * x.sum()))


def top_share(counts: Sequence[float], fraction: float = 0.01) -> float | None:
    """Share of the total held by the top ceil(fraction * n) entries (at least one)."""
    x = np.sort(np.asarray(counts, dtype=float))[::-1]
    if len(x) == 0 or x.sum() == 0:
        return None
    k = max(1, math.ceil(fraction * len(x)))
    return float(x[:k].sum() / x.sum())


def bucket_of(t_ms: int, bucket_ms: int) -> int:
    return t_ms - t_ms % bucket_ms


def cold_start_buckets(cells: Iterable[tuple], data_start_ms: int, cfg: ColdStartConfig) -> dict:
    """(bucket_start_ms, item, exposures, clicks, new_exposures, new_clicks, judged_exposures,
    judged_clicks) cells -> per-bucket trend and whole-run figures.

    An exposure is *judged* when its time minus new_item_age is inside the data (before that,
    every item looks new: its first sighting may predate the data). New-item shares use judged
    exposures only; a bucket whose start is not judged is marked censored.
    """
    age_ms = int(cfg.new_item_age * 1000)
    per_bucket: dict = {}
    for b, item, e, c, ne, nc, je, jc in cells:
        per_bucket.setdefault(b, []).append((item, e, c, ne, nc, je, jc))
    buckets = []
    totals = dict(exposures=0, clicks=0, new_exposures=0, new_clicks=0, judged_exposures=0, judged_clicks=0)
    for b in sorted(per_bucket):
        rows = sorted(per_bucket[b])
        e = sum(r[1] for r in rows)
        c = sum(r[2] for r in rows)
        ne, nc = sum(r[3] for r in rows), sum(r[4] for r in rows)
        je, jc = sum(r[5] for r in rows), sum(r[6] for r in rows)
        for k, v in zip(totals, (e, c, ne, nc, je, jc)):
            totals[k] += v
        counts = [r[1] for r in rows]
        buckets.append(
            {
                "bucket_start_ms": b,
                "censored": b - age_ms < data_start_ms,
                "items": len(rows),
                "exposures": e,
                "clicks": c,
                "new_exposure_share": ne / je if je else None,
                "new_click_share": nc / jc if jc else None,
                "gini": gini(counts),
                "top1pct_share": top_share(counts, 0.01),
            }
        )
    return {
        "new_item_age_s": cfg.new_item_age,
        "bucket_s": cfg.bucket,
        "data_start_ms": data_start_ms,
        "buckets": buckets,
        **totals,
        "new_exposure_share": totals["new_exposures"] / totals["judged_exposures"]
        if totals["judged_exposures"]
        else None,
        "new_click_share": totals["new_clicks"] / totals["judged_clicks"] if totals["judged_clicks"] else None,
    }


# --- position bias ---------------------------------------------------------------------------


def is_randomised_slate(slate: dict, randomised_policies: Sequence[str], tol: float = 1e-3) -> bool:
    """A slate from a uniform placement: a named uniform policy, or every propensity equal to 1/n_items."""
    if slate.get("policy") in randomised_policies:
        return True
    items = slate.get("items") or []
    if len(items) < 2:
        return False
    u = 1.0 / len(items)
    return all(it.get("propensity") is not None and abs(it["propensity"] - u) <= tol * u for it in items)


def position_curve_randomised(cells: Iterable[tuple], max_position: int) -> dict:
    """(position, exposures, clicks) from randomised slates -> relative examination per position.

    Items are placed at random, so relevance is independent of position and E[CTR_k] = theta_k x
    mean relevance: theta_k / theta_1 = CTR_k / CTR_1.
    """
    n = np.zeros(max_position)
    c = np.zeros(max_position)
    for pos, e, k in cells:
        i = min(int(pos), max_position) - 1
        n[i] += e
        c[i] += k
    ctr = np.divide(c, n, out=np.full(max_position, np.nan), where=n > 0)
    if not n[0] or not c[0]:
        raise ValueError("no clicks at position 1 in the randomised traffic: cannot normalise the curve")
    return {
        "method": "randomised",
        "exposures": n.tolist(),
        "clicks": c.tolist(),
        "propensity": [None if math.isnan(v) else float(v / ctr[0]) for v in ctr],
    }


def position_curve_em(
    cells: Iterable[tuple],
    max_position: int,
    iterations: int = 5000,
    tolerance: float = 1e-9,
    min_item_exposures: int = 50,
) -> dict:
    """Position-based click model (P(click) = theta_position x gamma_item) fitted by EM on
    (item, position, exposures, clicks) cells; theta returned relative to position 1.

    E-step for a non-click at (k, d): P(examined, not relevant) = theta(1-gamma)/(1-theta gamma),
    P(not examined, relevant) = (1-theta)gamma/(1-theta gamma) (Chuklin, Markov, de Rijke,
    'Click Models for Web Search', 4.2); the M-step averages over the cells' exposures.

    Two changes to the textbook fit make it work on real traffic (thousands of items, one or two
    exposures each):
    - items with fewer than `min_item_exposures` exposures share ONE pooled relevance. Fitted on
      their own, an item clicked once at position 5 gets gamma near 1 and the EM explains the click
      by raising theta_5; over thousands of such items the curve is pulled towards 1 and the fit
      never converges (on generated traffic with a 1/k^0.8 curve it gave 0.76 instead of 0.57 at
      position 2).
    - theta x gamma is only identified up to a scale, so after each M-step theta is divided by
      theta_1 (and gamma multiplied by it): the fit cannot wander along that ridge until a
      parameter hits the [0, 1] bound, which is what distorted long runs.
    The result says whether the fit converged (largest parameter change below `tolerance` before
    `iterations`) and the last change.
    """
    cells = [(str(item), min(int(pos), max_position) - 1, float(e), float(k)) for item, pos, e, k in cells]
    if not cells:
        raise ValueError("no exposures")
    per_item: dict = {}
    for item, _, e, _ in cells:
        per_item[item] = per_item.get(item, 0.0) + e
    own = sorted(d for d, n in per_item.items() if n >= min_item_exposures)
    ix = {d: i for i, d in enumerate(own)}
    pooled_ix = len(own)
    n_groups = len(own) + 1
    cells.sort()
    d_idx = np.array([ix.get(c[0], pooled_ix) for c in cells])
    k_idx = np.array([c[1] for c in cells])
    n = np.array([c[2] for c in cells])
    clicks = np.array([c[3] for c in cells])
    n_pos = np.bincount(k_idx, weights=n, minlength=max_position)
    n_item = np.bincount(d_idx, weights=n, minlength=n_groups)
    if not n_pos[0] or not clicks[k_idx == 0].sum():
        raise ValueError("no clicks at position 1: cannot normalise the curve")
    theta = np.full(max_position, 0.5)
    theta[0] = 1.0
    gamma = np.full(n_groups, 0.5)
    change = float("inf")
    done = 0
    for done in range(1, iterations + 1):  # noqa: B007 - `done` (iterations run) is read after the loop
        t, g = theta[k_idx], gamma[d_idx]
        denom = np.maximum(1 - t * g, 1e-12)
        non = n - clicks
        e_pos = clicks + non * t * (1 - g) / denom
        e_item = clicks + non * (1 - t) * g / denom
        new_theta = np.divide(
            np.bincount(k_idx, weights=e_pos, minlength=max_position),
            n_pos,
            out=np.full(max_position, 0.5),
            where=n_pos > 0,
        )
        new_gamma = np.divide(
            np.bincount(d_idx, weights=e_item, minlength=n_groups),
            n_item,
            out=np.full(n_groups, 0.5),
            where=n_item > 0,
        )
        scale = max(new_theta[0], 1e-12)  # theta_1 = 1: fixes the scale theta x gamma leaves free
        new_theta = np.clip(new_theta / scale, 1e-6, 1.0)
        new_gamma = np.clip(new_gamma * scale, 1e-9, 1 - 1e-9)
        change = float(max(np.max(np.abs(new_theta - theta)), np.max(np.abs(new_gamma - gamma))))
        theta, gamma = new_theta, new_gamma
        if change < tolerance:
            break
    click_pos = np.bincount(k_idx, weights=clicks, minlength=max_position)
    ctr = np.divide(click_pos, n_pos, out=np.zeros(max_position), where=n_pos > 0)
    return {
        "method": "em",
        "iterations": done,
        "converged": change < tolerance,
        "final_change": change,
        "tolerance": tolerance,
        "items": len(per_item),
        "items_own_relevance": len(own),
        "pooled_exposures": float(n_item[pooled_ix]),
        "exposures": n_pos.tolist(),
        "clicks": click_pos.tolist(),
        "naive_ctr_ratio": [float(v / ctr[0]) if n_pos[i] and ctr[0] else None for i, v in enumerate(ctr)],
        "propensity": [float(theta[i] / theta[0]) if n_pos[i] else None for i in range(max_position)],
    }


def position_weights_table(curve: dict, max_weight: float) -> dict:
    """The file `labels.position_weights` reads: per position, propensity and weight = min(1/propensity, cap)."""
    positions = {}
    last = None
    observed = [i for i, n in enumerate(curve["exposures"]) if n]
    # positions past the last observed one are left out: labels give them the last entry's weight
    for i, p in enumerate(curve["propensity"][: observed[-1] + 1 if observed else 0]):
        if p is None or p <= 0:
            if last is None:
                continue
            p = last  # a position with no data takes the estimate of the nearest one above it
        last = p
        positions[str(i + 1)] = {
            "propensity": p,
            "weight": min(1.0 / p, max_weight),
            "exposures": int(curve["exposures"][i]),
        }
    return {
        "method": curve["method"],
        "max_weight": max_weight,
        "positions": positions,
        "applies_to": "positive labels (inverse-propensity weighting of clicks)",
    }


# --- quality gate ----------------------------------------------------------------------------


def _row(slo, value, threshold, ok, message, mode):
    if ok is False:
        message = f"BREACH: {message}" + (" (warn mode: reported, the job does not fail)" if mode == "warn" else "")
    elif ok is None:
        message = f"not evaluated: {message}"
    return {"slo": slo, "value": value, "threshold": threshold, "ok": ok, "message": message}


# Each gate: (evaluation, config, threshold) -> (slo, value, threshold, ok, message) rows; ok None =
# not evaluated (no data), which `_row` reports as such.


def _judge(name, value, t, ok, message, empty):
    """No value -> not evaluated with `empty`; else `ok(value)` and `message(value)`."""
    if value is None:
        return (name, None, t, None, empty)
    return (name, value, t, ok(value), message(value))


def _gate_srm(evaluation, cfg, alpha):
    """One row an experiment: its sample-ratio-mismatch p-value against alpha."""
    for exp_id, exp in sorted(((evaluation.get("experiments") or {}).get("experiments") or {}).items()):
        srm = exp.get("srm")
        name = f"srm.{exp_id}"
        if srm is None:
            yield (name, None, alpha, None, f"no split configured (evaluation.experiments.experiments.{exp_id}.split)")
        elif srm["p_value"] is None:
            yield (name, None, alpha, None, "no units in the configured variants")
        else:
            obs = ", ".join(f"{v} {r['observed']} (expected {r['expected']:.0f})" for v, r in srm["variants"].items())
            extra = f"; variants outside the split: {srm['unexpected']}" if srm["unexpected"] else ""
            yield (
                name,
                srm["p_value"],
                alpha,
                srm["ok"],
                f"chi-square {srm['chi2']:.3f} (df {srm['df']}), p = {srm['p_value']:.3g} "
                f"(min {alpha:g}): {obs}{extra}",
            )


def _gate_at_least(name, key, part_of, message, empty, fail_when_empty=False):
    """A gate on part_of(evaluation)[key] >= threshold; message(part, cfg, value, threshold) explains it.
    With no value the gate is not evaluated, or breached when `fail_when_empty`."""

    def gate(evaluation, cfg, t):
        part = part_of(evaluation)
        if fail_when_empty and part.get(key) is None:
            yield (name, None, t, False, empty)
            return
        yield _judge(name, part.get(key), t, lambda v: v >= t, lambda v: message(part, cfg, v, t), empty)

    return gate


def _excluded_text(ope) -> str:
    excluded = ope.get("excluded") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(excluded.items())) or "none"


def _gate_evaluable(evaluation, cfg, t):
    """Always on: an evaluation with no usable exposure has no estimate, whatever else passes."""
    ope = evaluation.get("ope") or {}
    used = ope.get("exposures", 0)
    yield (
        "ope.evaluable_exposures",
        used,
        t,
        used >= t,
        f"{used} of {ope.get('labels_read', 0)} labels usable for off-policy estimates "
        f"(excluded: {_excluded_text(ope)})",
    )


def _gate_excluded_share(evaluation, cfg, t):
    ope = evaluation.get("ope") or {}
    share = ope.get("excluded_share")
    if share is None:
        yield ("ope.excluded_share", None, t, None, "no labels read")
        return
    yield (
        "ope.excluded_share",
        share,
        t,
        share <= t,
        f"{ope['labels_read'] - ope['exposures']} of {ope['labels_read']} labels excluded = {100 * share:.3g}% "
        f"(max {100 * t:.3g}%): {_excluded_text(ope)}",
    )


def _gate_n_actions(evaluation, cfg, t):
    """The built-in uniform policy chooses among n_actions items: more items in the logs means a wrong n_actions."""
    seen = (evaluation.get("ope") or {}).get("items_seen")
    if seen is None:
        return
    yield (
        "ope.n_actions",
        seen,
        t,
        seen <= t,
        f"{seen} distinct items in the labels, uniform target over n_actions {t}"
        + ("" if seen <= t else ": raise evaluation.ope.n_actions to the catalogue size"),
    )


def _gate_position_curve(evaluation, cfg, t):
    """Always on: a position-bias method that could not run, or an EM fit that did not converge, fails
    (no position_weights.json is written then)."""
    pb = evaluation.get("position_bias") or {}
    name = "position_bias.curve"
    if pb.get("error"):
        if pb.get("requested_method") == "auto" and not pb.get("exposures"):
            yield (name, None, None, None, f"no slates ({pb['error']})")
        else:
            yield (name, None, None, False, f"method {pb.get('method')}: {pb['error']}")
        return
    curve = pb.get("curve") or {}
    if curve.get("method") == "em" and not curve.get("converged"):
        yield (
            name,
            curve.get("final_change"),
            curve.get("tolerance"),
            False,
            f"EM did not converge in {curve.get('iterations')} iterations (last change "
            f"{curve.get('final_change'):.3g}, tolerance {curve.get('tolerance'):g}); raise "
            "evaluation.position_bias.em_iterations",
        )
        return
    if curve:
        extra = f", EM converged in {curve['iterations']} iterations" if curve.get("method") == "em" else ""
        yield (name, 1, None, True, f"method {pb.get('method')}{extra}")


def _new_exposure_message(cs, cfg, share, t):
    return (
        f"{cs['new_exposures']} of {cs['judged_exposures']} judged exposures went to items first "
        f"seen within {cfg.cold_start.new_item_age:g} s = {100 * share:.3g}% (min {100 * t:.3g}%)"
    )


def _ess_message(d, cfg, share, t):
    return (
        f"effective sample size {d['ess']:.1f} = {100 * share:.3g}% of exposures "
        f"(min {100 * t:.3g}%); max weight {d['max_weight']:.3g}"
    )


def _gate_concentration(key):
    """The worst time bucket's `key` (gini, top1pct_share) against its maximum."""

    def gate(evaluation, cfg, t):
        name = f"concentration.{key}"
        buckets = (evaluation.get("cold_start") or {}).get("buckets") or []
        vals = [(b[key], b["bucket_start_ms"]) for b in buckets if b[key] is not None]
        if not vals:
            yield (name, None, t, None, "no exposures")
            return
        worst, at = max(vals)
        over = sum(1 for v, _ in vals if v > t)
        when = dt.datetime.fromtimestamp(at / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        yield (
            name,
            worst,
            t,
            not over,
            f"worst bucket {when}: {worst:.4f} (max {t:g}); {over} of {len(vals)} buckets over",
        )

    return gate


# (threshold: EvaluationConfig -> value or None = gate off, gate) in report order.
_GATES = (
    (lambda cfg: cfg.experiments.srm_alpha, _gate_srm),
    (
        lambda cfg: cfg.cold_start.new_exposure_share_min,
        _gate_at_least(
            "cold_start.new_exposure_share",
            "new_exposure_share",
            lambda ev: ev.get("cold_start") or {},
            _new_exposure_message,
            "no exposure is new_item_age after the data start",
        ),
    ),
    (lambda cfg: cfg.cold_start.gini_max, _gate_concentration("gini")),
    (lambda cfg: cfg.cold_start.top1pct_share_max, _gate_concentration("top1pct_share")),
    (lambda cfg: 1, _gate_evaluable),
    (lambda cfg: cfg.ope.max_excluded_share, _gate_excluded_share),
    (lambda cfg: cfg.ope.n_actions if cfg.ope.target_policy == "uniform" else None, _gate_n_actions),
    (
        lambda cfg: cfg.ope.min_ess_share,
        _gate_at_least(
            "ope.ess_share",
            "ess_share",
            lambda ev: (ev.get("ope") or {}).get("diagnostics") or {},
            _ess_message,
            "no evaluable exposure: the effective sample size is 0",
            fail_when_empty=True,
        ),
    ),
    (lambda cfg: True, _gate_position_curve),
)


def evaluation_slos(evaluation: dict, cfg: EvaluationConfig, mode: str = "fail") -> list[dict]:
    """The evaluation's gates, in the shape of transforms.quality.evaluate_slos rows; gates that are off give none."""
    rows = []
    for threshold, gate in _GATES:
        t = threshold(cfg)
        if t is not None:
            rows.extend(_row(*r, mode) for r in gate(evaluation, cfg, t))
    return rows


def load_position_weights(path: str) -> tuple[tuple[int, float], ...]:
    """The `positions` table of a position_weights.json (written by pipelines.evaluate) ->
    ((position, weight), ...) sorted by position. ValueError naming the file and the bad entry."""
    try:
        data = json.loads(_read_bytes(path))
    except OSError as e:
        raise ValueError(f"cannot read position weights file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"position weights file {path} is not JSON: {e}") from None
    table = data.get("positions") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f"position weights file {path}: needs a non-empty 'positions' object "
            "(write it with python -m pipelines.evaluate)"
        )
    out = []
    for k, v in table.items():
        w = v.get("weight") if isinstance(v, dict) else v
        try:
            pos = int(k)
        except ValueError:
            raise ValueError(f"position weights file {path}: position {k!r} is not an integer") from None
        if pos < 1 or isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ValueError(
                f"position weights file {path}: position {k!r} needs a position >= 1 and a finite weight > 0, got {w!r}"
            )
        out.append((pos, float(w)))
    return tuple(sorted(out))
