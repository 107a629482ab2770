"""Synthetic implicit-feedback traffic for the recommender pipeline, with a ground-truth sidecar.

    python -m feedback_tools.generate --events N --output FILE [--seed 42]
        [--start 2026-11-01T00:00:00Z] [--format jsonl|jsonl.gz|avro] [--knob name=value ...]
        [--arrival-field NAME] [--lateness SECONDS]

or from Python: ``generate(n_events, output_path, seed=42, start=..., fmt=None,
arrival_field=None, lateness_s=3600, **knobs)``.

``--events N`` is EXACTLY the number of records written (lines of JSON, or Avro records),
duplicates and malformed records included.  The format defaults from the extension
(``.jsonl``, ``.jsonl.gz``, ``.avro``).  Same seed and arguments -> byte-identical output
(gzip header carries no name and mtime 0; the Avro sync marker is derived from the seed).

Records are written in ARRIVAL order (the order a collector received them).  The simulation
walks users/sessions in event-time order with a heap and holds a reorder buffer keyed by
arrival time; a record is written once the simulation clock has passed its arrival time
(every later record has event_time >= clock and arrival >= event_time), so memory stays
bounded by the events in flight -- normal delays of seconds plus the few late ones.

Traffic (defaults; every proportion is a knob, see ``DEFAULT_KNOBS``):
  * human users (ids ``u012345``; ~10% numeric JSON integers) in sessions (>= 41 min apart),
    each session a chain of recommendation requests (>= 15 s apart, strictly sequential: a
    request's outcomes end before the next request) of 4-12 impressions at positions 1..k with
    propensity (1/pos^0.7 normalised; explore-eps mixes in uniform) and policy; position-biased
    clicks (relevance x 1/pos^0.8), click latency lognormal (median 3 s, floor 400 ms), then
    view, dwell (dwell_ms), add_to_cart, purchase (value); scroll and skip.  Humans never exceed
    28 non-impression / 56 total events in any 60 s of event time.
  * bots (~5% of records): crawler user agents; human UA at 3-8 events/s for 3-20 min;
    human UA with every click 10-150 ms after its impression (>= 5 per session, <= 12 events/min);
    steady crawlers with a browser UA (unknown to the crawler list): one view every 0.7-1.6 s with
    3% timing jitter for 3-10 min (a machine's clock; intended truth ``machine_cadence``). Every seed
    and start has at least one of these.
  * boundary runs: the first sustained-rate and superhuman-click bots start so that their first run
    straddles an hour boundary (random within the bot window), the first steady crawler straddles
    the first UTC midnight after the start (traffic spans 48 h, bots start in its first 60%, so one
    always lies in range), and two extra human users have a session with that midnight / an hour
    boundary inside it. So every seed and start date covers runs cut by clock boundaries.
  * ~2% of well-formed, consenting events re-delivered 1-3 more times, byte-identical, later.
  * ~1% of human users send ``consent: false`` on every event.
  * ~1.5% malformed records, one defect each, cycling over all reason codes.
  * arrival delay lognormal (median 1 s, cap 60 s); ~2% 2-90 min late, ~0.3% 3-12 h late
    (superhuman-click bots are never late, so their rule always fires on what arrives in time).
  * ~0.5% of human outcomes (click, view, dwell, add_to_cart, purchase, skip) have their impression
    lost upstream: the outcomes are emitted, the impression is not (orphan outcomes).
  * ~1% of human outcomes stall in the client's upload queue and arrive around their impression's
    label deadline D = impression_time + max(30 min, lateness_s): uniformly in
    [D - gap, outcome_time + lateness_s + gap], gap = outcome - impression time; about a third each
    on time, late outcome, too late.  (Late outcomes need arrival in (D, outcome_time + lateness],
    a band only `gap` wide, so ordinary late arrivals almost never produce one.)

Arrival-time envelope (``--arrival-field NAME``, JSON formats only): every record that is a JSON
object (all but ``malformed_json`` and ``not_an_object`` dead letters; oversize and bad-encoding
ones included) gets a first top-level field NAME = its arrival time in epoch ms (integer), as a
collector would stamp it.  Retried copies therefore differ in that field only (each copy has its
own, later, arrival).  Records stay in arrival order, so NAME never decreases down the file.  The
pipeline reads it with ``time.arrival_field: NAME`` (set ``time.lateness`` = ``lateness_s``).
Avro records get nothing (the schema has no such field): with ``fmt="avro"`` the option is ignored
and the truth is that of a run without arrival times.

Truth sidecar ``<output>.truth.json`` (also returned by ``generate``)::

    {"seed", "input_records",                      # records written (== n_events)
     "arrival_field": NAME or null,                # null without one (and always for Avro)
     "lateness_s": 3600,                           # the too-late limit and label lateness assumed
     "counts": {valid, duplicates, bots, dead_letter, consent_dropped, too_late},  # sum == input_records
     "dead_letter_by_reason": {<every contract reason code>: n},          # zeros included
     "bots_by_rule": {<every bot rule>: n},         # bot events (first copies), by their user's rule
     "bot_event_ids": [sorted], "bot_user_ids": [sorted, strings],
     "bot_event_ids_by_rule": {<every bot rule>: [sorted]},  # the rule the generator intended
     "duplicate_event_ids": {event_id: extra_copies},
     "consent_dropped_event_ids": [sorted],         # consent:false events (never duplicated)
     "too_late_event_ids": [sorted],                # one entry per too-late RECORD (an id repeats when
                                                    # several copies of it are too late); [] without arrival
     "valid_event_count_by_type": {<every event type>: n},
     "late_event_ids": {event_id: arrival_delay_seconds},  # only delays >= 120 s (2-90 min, 3-12 h)
     "event_time_range": [min_iso, max_iso],        # over all well-formed events (not dead letters)
     "labels": {...}, "labels_intended": {...}}     # see "Label truth" below

Each record lands in exactly one class, decided in this order: a defect -> dead_letter;
else consent false -> consent_dropped; else (with an arrival field) arrival - event_time >
lateness -> too_late; else 2nd/3rd/4th copy of an event_id in arrival order -> duplicates (the
first copy goes on); else an event of a bot user -> bots; else valid.  Copies arrive strictly
after the first copy with the same event time, so once the first copy is too late every copy is;
a later copy can be too late while the first is not (then that copy is too_late, not a duplicate).
Dead letters and consent:false events are never duplicated; bots and consent:false users are
never given defects.  Every bot user's activity runs (events < 10 min apart) each trip its rule
on their own, so a per-run detector and this per-user truth agree.

Label truth.  ``labels`` applies the pipeline's label rules (``transforms.labels``: ``attribute``,
``settle``, ``make_label`` with the default ``LabelsConfig`` -- window 30 min, clock skew 5 s,
positives purchase/add_to_cart/click, negative skip, min click dwell 0 -- and ``lateness_s``) to the
generator's own record of the valid human events (first copies, with the first copy's arrival),
grouped by (user, item), re-implemented here without Beam (tests cross-check it with ``settle``)::

    "labels": {"exposures": n,                  # valid human impressions with an item_id
               "positives": n, "negatives": n,  # labels by the rules; positives + negatives == exposures
               "positive_label_ids": [sorted impression event_ids],
               "by_outcome": {"click": n, "add_to_cart": n, "purchase": n},  # exposures whose label has it
               "orphan_outcomes": n,            # outcomes with an item_id attributed to no exposure
               "late_outcomes": n}              # attributed, arrival > impression_time + max(window, lateness)

``labels_intended`` has the same keys, computed from what CAUSED each outcome (the impression of the
same request and item) instead of the attribution rule, plus
``orphans_by_cause`` ({impression_lost_upstream, impression_dead_letter, impression_too_late}),
``ambiguous`` (outcomes whose rule attribution differs from their cause, by kind:
``outcome_beyond_window`` -- more than the window after its impression (long dwell, then a purchase),
so the rule makes it an orphan; ``attributed_to_other_exposure`` -- its impression never became a
valid event and, having no request_id, it joins an earlier impression of the same item within the
window; ``other`` -- always 0) and ``ambiguous_label_ids`` (exposures whose label or outcome types
differ between the two).  So rule orphans == intended orphans + beyond_window - attributed_to_other.
Without an arrival field nothing is late.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import math
import random
import sys
import time
from bisect import bisect_left, bisect_right
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

import orjson

from feedback_tools import sample_agents
from transforms import contract as C

(IMPRESSION, CLICK, VIEW, DWELL, SCROLL, SKIP, ADD_TO_CART, PURCHASE) = C.DEFAULT_EVENT_TYPES

# Field names used below; checked against the contract at import.
_FIELDS_USED = (
    "event_id",
    "event_type",
    "event_time",
    "user_id",
    "session_id",
    "request_id",
    "item_id",
    "position",
    "propensity",
    "policy",
    "dwell_ms",
    "value",
    "experiment_id",
    "variant",
    "context",
    "user_agent",
    "ip",
    "consent",
    "schema_version",
)
assert set(_FIELDS_USED) <= set(C.REQUIRED_FIELDS) | set(C.OPTIONAL_FIELDS), "contract changed"
assert len(C.DEFAULT_EVENT_TYPES) == 8

FORMATS = ("jsonl", "jsonl.gz", "avro")
DEFAULT_START = "2026-11-01T00:00:00Z"
# Reasons a JSON line can carry; an Avro record can only carry these three.
JSON_REASONS = (
    C.MALFORMED_JSON,
    C.BAD_ENCODING,
    C.NOT_AN_OBJECT,
    C.MISSING_FIELD,
    C.WRONG_TYPE,
    C.BAD_TIMESTAMP,
    C.UNKNOWN_EVENT_TYPE,
    C.OUT_OF_RANGE,
    C.OVERSIZE_PAYLOAD,
    C.SCHEMA_VIOLATION,
)
AVRO_REASONS = (C.BAD_TIMESTAMP, C.UNKNOWN_EVENT_TYPE, C.OUT_OF_RANGE)
OVERSIZE_BYTES = 32768  # a line longer than this is oversize (the pipeline's default limit)

DEFAULT_KNOBS = {
    "bot_fraction": 0.05,  # share of records from bot users (first copies)
    "bot_rule_split": {
        C.BOT_RULE_SUSTAINED_RATE: 0.35,
        C.BOT_RULE_CRAWLER_UA: 0.30,
        C.BOT_RULE_SUPERHUMAN_CLICKS: 0.20,
        C.BOT_RULE_MACHINE_CADENCE: 0.15,
    },
    "malformed_fraction": 0.015,  # share of records that are dead letters
    "duplicate_fraction": 0.02,  # share of well-formed consenting events re-delivered
    "consent_optout_fraction": 0.01,  # share of human users with consent false
    "late_fraction": 0.02,  # 2-90 min late
    "very_late_fraction": 0.003,  # 3-12 h late
    "numeric_user_fraction": 0.10,
    "v1_fraction": 0.20,  # users on the old producer (JSON formats only)
    "session_id_fraction": 0.70,
    "experiment_fraction": 0.50,
    "iso_time_fraction": 0.60,  # the rest: epoch milliseconds
    "context_fraction": 0.30,  # of v2 requests
    "pii_fraction": 0.06,  # of contexts
    "request_id_omit_fraction": 0.15,  # of outcome events
    "lost_impression_fraction": 0.005,  # of human items with outcomes: impression lost upstream (orphans)
    "stalled_outcome_fraction": 0.01,  # of human outcomes: upload stalls to ~ impression + max(window, lateness)
    "n_items": 5000,
    "duration_hours": 48.0,  # span over which new users arrive (bots start in its first 60%)
}

EXPERIMENT_ID = "exp-ranker-2026q4"
CONTROL, TREATMENT = "control", "treatment"
RANKER_V3, RANKER_V4, EXPLORE = "ranker-v3", "ranker-v4", "explore-eps"
EXPLORE_EPS = 0.2

# Human pacing limits, strictly inside "30 non-impression / 60 total in any 60 s".
HUMAN_MAX_NON_IMPRESSION_PER_MIN = 28
HUMAN_MAX_EVENTS_PER_MIN = 56
HUMAN_MIN_CLICK_LATENCY_MS = 400
SESSION_GAP_MIN_MS = 41 * 60_000
REQUEST_GAP_MIN_MS = 15_000

DEFAULT_LATENESS_S = 3600
# The label rules at the pipeline's defaults (transforms.config.LabelsConfig; a test checks they agree).
LABEL_WINDOW_MS = 30 * 60_000
LABEL_CLOCK_SKEW_MS = 5_000
LABEL_OUTCOME_TYPES = frozenset((CLICK, VIEW, DWELL, ADD_TO_CART, PURCHASE, SKIP))
LABEL_POSITIVE = {PURCHASE: 5.0, ADD_TO_CART: 3.0, CLICK: 1.0}
LABEL_NEGATIVE = {SKIP: 1.0}
LABEL_MIN_CLICK_DWELL_MS = 0
BY_OUTCOME = (CLICK, ADD_TO_CART, PURCHASE)
# Why an outcome has no valid exposure to join (its cause, when not an impression's event_id).
CAUSE_LOST = "impression_lost_upstream"
CAUSE_DEAD_LETTER = "impression_dead_letter"
CAUSE_TOO_LATE = "impression_too_late"
AMBIGUOUS_KINDS = ("outcome_beyond_window", "attributed_to_other_exposure", "other")

# Measured mean records per human user at the defaults (calibrates the arrival rate).
_EVENTS_PER_HUMAN = 65.0
_MEAN_EXTRA_COPIES = 1.5  # 1, 2 or 3 extra copies with probability 0.6, 0.3, 0.1

_TZS = (("Z", 0),) * 7 + (
    ("+01:00", 60),
    ("+02:00", 120),
    ("-05:00", -300),
    ("-08:00", -480),
    ("+05:30", 330),
    ("+09:00", 540),
    ("+00:00", 0),
)
_PAGES = ("home", "home", "search", "category", "pdp", "cart")
_QUERIES = (
    "running shoes",
    "wireless earbuds",
    "gift ideas",
    "crème brûlée torch",
    "Müsli",
    "kids lego",
    "winter jacket",
    "coffee grinder",
    "yoga mat",
    "phone case",
    "tênis",
    "desk lamp",
    "board games",
    "niño toys",
    "water bottle",
    "headphones",
    "espresso",
)
_REFERRERS = ("google", "newsletter", "direct", "instagram", "partner")
_NAMES = ("jane.doe", "john.smith", "a.martin", "maria.garcia", "li.wei", "sam.taylor")
_DOMAINS = ("example.com", "example.org", "example.net")
_PHONES = (
    "+1 415 555 0134",
    "+1 (212) 555-0187",
    "+44 20 7946 0958",
    "+49 30 901820",
    "415-555-0199",
    "+33 1 99 00 12 34",
)


# --- small helpers -------------------------------------------------------------------------------


def _parse_start(start) -> int:
    if isinstance(start, (int, float)):
        return int(start)
    if isinstance(start, datetime):
        t = start
    else:
        t = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(round(t.timestamp() * 1000))


_DAY_CACHE: dict = {}
_EPOCH = datetime(1970, 1, 1)


def _iso(ms: int, off_min: int = 0, suffix: str = "Z") -> str:
    """Epoch ms -> ISO-8601 with millisecond precision, shown at UTC offset ``off_min``."""
    local = ms + off_min * 60_000
    secs, msr = divmod(local, 1000)
    day, sod = divmod(secs, 86400)
    ds = _DAY_CACHE.get(day)
    if ds is None:
        ds = _DAY_CACHE[day] = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%d")
    h, rem = divmod(sod, 3600)
    m, s = divmod(rem, 60)
    return f"{ds}T{h:02d}:{m:02d}:{s:02d}.{msr:03d}{suffix}"


def _infer_format(path: str) -> str:
    p = str(path).lower()
    for fmt in ("jsonl.gz", "jsonl", "avro"):
        if p.endswith("." + fmt):
            return fmt
    raise ValueError(f"cannot infer the format of {path!r}; use --format {'|'.join(FORMATS)}")


def _load_avro_schema():
    """The event schema the pipeline reads (the generator runs from the repository root, never shipped).

    Unparsed on purpose: fastavro writes the schema it is given into the file header, and a parsed
    schema orders some field attributes by set iteration, which changes with PYTHONHASHSEED.
    """
    path = Path(__file__).resolve().parent.parent / "config" / "schemas" / "event.v2.avsc"
    return json.loads(path.read_text())


class _Slate(NamedTuple):
    """One recommendation request: the items shown and the policy's propensity at each position."""

    rid: str
    kk: int
    policy: str
    props: list
    items: list


class _Actor:
    """One user (human or bot) and everything constant about its client."""

    __slots__ = (
        "uid",
        "uid_str",
        "rule",
        "ua",
        "ip",
        "consent",
        "consent_p",
        "v1",
        "variant",
        "policy",
        "tz",
        "sid_keep",
        "rid_always",
        "genre",
        "malformable",
        "imps",
        "lab",
    )  # humans: (request, item) -> impression's fate; item -> label-stage events


# --- the simulation ------------------------------------------------------------------------------


class _Sim:
    def __init__(self, n, seed, start_ms, fmt, knobs, arrival_field=None, lateness_s=DEFAULT_LATENESS_S):
        self.n, self.seed, self.start_ms, self.fmt = n, seed, start_ms, fmt
        # Arrival-time envelope: JSON formats only (Avro has no field for it).
        self.arrival_field = None if fmt == "avro" else arrival_field
        self.env_prefix = b"{" + orjson.dumps(arrival_field) + b":" if self.arrival_field else None
        self.lateness_s = lateness_s
        self.lateness_ms = int(lateness_s * 1000)  # as transforms.parse.ValidationRules does
        self.k = k = knobs
        self.avro = fmt == "avro"
        rng = self.rng = random.Random(seed)
        self.rnd, self.bits, self.gauss = rng.random, rng.getrandbits, rng.gauss
        self.p_omit_rid, self.p_iso, self.p_dup = (
            k["request_id_omit_fraction"],
            k["iso_time_fraction"],
            k["duplicate_fraction"],
        )
        self.p_very_late = k["very_late_fraction"]
        self.p_any_late = k["very_late_fraction"] + k["late_fraction"]
        self.reasons = AVRO_REASONS if self.avro else JSON_REASONS
        self.v1_fraction = 0.0 if self.avro else k["v1_fraction"]
        self.p_enroll = min(1.0, k["experiment_fraction"] / max(1e-9, 1.0 - self.v1_fraction))
        self.sid_keep = min(1.0, k["session_id_fraction"] / 0.8)
        self._catalogue(k["n_items"])
        self._tables()
        self.human_agents = sample_agents.HUMAN_AGENTS
        self.crawler_agents = self._crawler_agents()
        # user ids: random, unique, same space for humans and bots
        self.expected_users = max(100, int(n / _EVENTS_PER_HUMAN * 1.5))
        self.uid_space = max(1_000_000, 20 * self.expected_users)
        self.uid_width = len(str(self.uid_space - 1))
        self.used_uids, self.used_numeric = set(), set()
        # output bookkeeping
        self.lines = 0
        self.seq = 0
        self.arrivals = []  # reorder buffer: (arrival_ms, seq, payload)
        self.counts = dict.fromkeys(C.OUTCOMES, 0)
        self.dl_reason = dict.fromkeys(C.REASON_CODES, 0)
        self.bot_rule_counts = dict.fromkeys(C.BOT_RULES, 0)
        self.bot_event_ids, self.bot_user_ids = [], set()
        self.bot_ids_by_rule = {r: [] for r in C.BOT_RULES}
        self.dup_ids, self.consent_ids, self.late_ids = {}, [], {}
        self.too_late_ids = []
        self.p_lost_imp, self.p_stall = k["lost_impression_fraction"], k["stalled_outcome_fraction"]
        self.label_span_ms = max(LABEL_WINDOW_MS, self.lateness_ms)
        self.lab_rule, self.lab_intent = self._label_acc(), self._label_acc()
        self.lab_intent.update(
            orphans_by_cause=dict.fromkeys((CAUSE_LOST, CAUSE_DEAD_LETTER, CAUSE_TOO_LATE), 0),
            ambiguous=dict.fromkeys(AMBIGUOUS_KINDS, 0),
            ambiguous_label_ids=[],
        )
        self.valid_by_type = dict.fromkeys(C.DEFAULT_EVENT_TYPES, 0)
        self.tmin, self.tmax = None, None
        self.reason_cycle, self.pending_reason = [], None
        lines_per_event = 1.0 + k["duplicate_fraction"] * _MEAN_EXTRA_COPIES
        self.p_malformed = (
            k["malformed_fraction"]
            * lines_per_event
            / max(1e-9, (1.0 - k["bot_fraction"]) * (1.0 - k["consent_optout_fraction"]))
        )

    # -- static tables --
    def _catalogue(self, n_items):
        rng = self.rng
        width = max(5, len(str(n_items - 1)))
        self.item_ids = [f"i{j:0{width}d}" for j in range(n_items)]
        by_pop = list(range(n_items))
        rng.shuffle(by_pop)  # by_pop[rank] = item index
        w = [1.0 / (r + 1) ** 1.05 for r in range(n_items)]
        tot, acc, cum = sum(w), 0.0, []
        for x in w:
            acc += x
            cum.append(acc / tot)
        cum[-1] = 1.0
        self.cum, self.by_pop = cum, by_pop
        self.quality = [0.04 + 0.30 * rng.random() ** 2 for _ in range(n_items)]
        self.genre = [rng.randrange(20) for _ in range(n_items)]
        self.price = [round(max(0.99, math.exp(rng.gauss(math.log(25.0), 0.9))), 2) for _ in range(n_items)]

    def _tables(self):
        self.exam = [1.0 / (i + 1) ** 0.8 for i in range(12)]
        self.props = {}
        for policy in (RANKER_V3, RANKER_V4, EXPLORE):
            for kk in range(4, 13):
                w = [1.0 / (i + 1) ** 0.7 for i in range(kk)]
                s = sum(w)
                p = [x / s for x in w]
                if policy == EXPLORE:
                    p = [(1 - EXPLORE_EPS) * x + EXPLORE_EPS / kk for x in p]
                self.props[policy, kk] = [max(0.0001, round(x, 4)) for x in p]

    def _crawler_agents(self):
        import crawleruseragents

        sample_agents.check_agents()
        extra = []
        for entry in crawleruseragents.CRAWLER_USER_AGENTS_DATA:
            for ua in entry.get("instances") or ():
                if 20 <= len(ua) <= 250 and ua.isascii() and ua.isprintable():
                    extra.append(ua)
        return list(sample_agents.CRAWLER_AGENTS), extra

    def _crawler_agent(self):
        """A curated crawler UA (70%) or an instance from crawler-user-agents, verified."""
        import crawleruseragents

        curated, extra = self.crawler_agents
        if extra and self.rng.random() >= 0.7:
            for _ in range(20):
                ua = self.rng.choice(extra)
                if crawleruseragents.is_crawler(ua):
                    return ua
        return self.rng.choice(curated)

    # -- ids --
    def _uuid(self):
        x = self.bits(128)
        x = (x & ~(0xF000 << 64)) | (0x4000 << 64)
        x = (x & ~(0xC000 << 48)) | (0x8000 << 48)
        h = f"{x:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _new_actor(self, rule=None):
        rng, rnd = self.rng, self.rnd
        a = _Actor()
        if rnd() < self.k["numeric_user_fraction"]:
            while True:
                u = rng.randrange(10_000, 100_000_000)
                if u not in self.used_numeric:
                    break
            self.used_numeric.add(u)
            a.uid_str = str(u)
            a.uid = a.uid_str if self.avro else u
        else:
            while True:
                u = rng.randrange(self.uid_space)
                if u not in self.used_uids:
                    break
            self.used_uids.add(u)
            a.uid = a.uid_str = f"u{u:0{self.uid_width}d}"
        a.rule = rule
        a.ua = rng.choice(self.human_agents)
        if rnd() < 0.9:
            a.ip = rng.choice(
                (
                    f"192.0.2.{rng.randrange(1, 255)}",
                    f"198.51.100.{rng.randrange(1, 255)}",
                    f"203.0.113.{rng.randrange(1, 255)}",
                    f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                    f"172.{rng.randrange(16, 32)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                    f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                )
            )
        else:
            a.ip = f"2001:db8:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
        a.consent = not (rule is None and rnd() < self.k["consent_optout_fraction"])
        a.consent_p = 0.95
        a.v1 = rnd() < self.v1_fraction
        a.variant = None
        if not a.v1 and rnd() < self.p_enroll:
            a.variant = CONTROL if rnd() < 0.5 else TREATMENT
        a.policy = RANKER_V4 if a.variant == TREATMENT else RANKER_V3
        a.tz = rng.choice(_TZS)
        a.sid_keep = self.sid_keep if rnd() < 0.8 else 0.0
        a.rid_always = False
        a.genre = rng.randrange(20)
        a.malformable = rule is None and a.consent
        a.imps = {} if a.malformable else None
        a.lab = {} if a.malformable else None
        return a

    # -- building blocks --
    def _items(self, kk):
        cum, by_pop, rnd = self.cum, self.by_pop, self.rnd
        out = []
        while len(out) < kk:
            j = by_pop[bisect_right(cum, rnd())]
            if j not in out:
                out.append(j)
        return out

    def _context(self):
        rng, rnd = self.rng, self.rnd
        page = rng.choice(_PAGES)
        ctx = {"page": page}
        if page == "search":
            ctx["search_query"] = rng.choice(_QUERIES)
        if rnd() < 0.3:
            ctx["referrer"] = rng.choice(_REFERRERS)
        if rnd() < self.k["pii_fraction"]:
            if rnd() < 0.5:
                pii = f"{rng.choice(_NAMES)}@{rng.choice(_DOMAINS)}"
                key, text = rng.choice(
                    (("search_query", "gift for {}"), ("note", "contact {}"), ("search_query", "{}"))
                )
            else:
                pii = rng.choice(_PHONES)
                key, text = rng.choice((("note", "call me at {}"), ("search_query", "order {}")))
            ctx[key] = text.format(pii)
        return ctx

    def _slate(self, a, kk_max=12, explore=True):
        """A new request of ``a``'s: 4..kk_max items; with ``explore``, 5% go to the exploration policy."""
        rid = f"r{self.bits(64):016x}"
        kk = self.rng.randint(4, kk_max)
        policy = EXPLORE if explore and self.rnd() < 0.05 else a.policy
        return _Slate(rid, kk, policy, self.props[policy, kk], self._items(kk))

    def _impression(self, t, sid, s, i, ctx=None):
        """The impression of slate ``s`` at position i + 1."""
        fields = {"position": i + 1, "propensity": s.props[i], "policy": s.policy}
        return (t, IMPRESSION, sid, s.rid, self.item_ids[s.items[i]], fields, ctx)

    def _maybe_context(self, a):
        """A request context for some of a v2 client's requests (v1 records have no context field)."""
        return self._context() if (not a.v1 and self.rnd() < self.k["context_fraction"]) else None

    @staticmethod
    def _lognorm_ms(rng, median_ms, sigma, floor_ms, cap_ms):
        v = int(median_ms * math.exp(sigma * rng.gauss(0.0, 1.0)))
        return cap_ms if v > cap_ms else floor_ms if v < floor_ms else v

    # -- humans --
    def _human(self, a, t0):
        rng = self.rng
        t = t0
        n_sessions = 1 + min(7, int(rng.expovariate(1 / 1.6)))
        for _ in range(n_sessions):
            events = self._human_session(a, t)
            yield from events
            t = events[-1][0] + SESSION_GAP_MIN_MS + int(rng.expovariate(1 / (2.5 * 3_600_000)))

    def _human_session(self, a, t0):
        rng = self.rng
        sid = f"s{self.bits(48):012x}"
        out, rec_all, rec_non = [], [], []
        n_req = 1 + min(25, int(rng.expovariate(1 / 3.0)))
        t = t0
        for _ in range(n_req):
            req = self._human_request(a, sid, t)
            shift = 0
            while not _pace_ok(rec_all, rec_non, req, shift):
                shift += 5000
            if shift:
                req = [(e[0] + shift,) + e[1:] for e in req]
            out.extend(req)
            last = req[-1][0]
            for e in req:
                rec_all.append(e[0])
                if e[1] is not IMPRESSION:
                    rec_non.append(e[0])
            cut = last - 60_000
            rec_all = rec_all[bisect_left(rec_all, cut) :]
            rec_non = rec_non[bisect_left(rec_non, cut) :]
            t = max(
                req[0][0] + REQUEST_GAP_MIN_MS + int(rng.expovariate(1 / 20_000)),
                last + self._lognorm_ms(rng, 4000, 0.8, 1000, 120_000),
            )
        return out

    def _human_request(self, a, sid, t):
        """One request's impressions and what the user did with them, in event-time order."""
        rng, rnd, ids = self.rng, self.rnd, self.item_ids
        s = self._slate(a)
        ctx = self._maybe_context(a)
        out, imp_t = [], []
        tt = t
        for i in range(s.kk):
            tt += int(rnd() * 7)
            out.append(self._impression(tt, sid, s, i, ctx))
            imp_t.append(tt)
        if rnd() < 0.5:
            out.append(
                (t + self._lognorm_ms(rng, 2500, 0.6, 500, 20_000), SCROLL, sid, s.rid, ids[s.items[-1]], None, ctx)
            )
        clicked = self._clicked(a, s.items)
        cur = t
        for i in clicked:
            chain, cur = self._click_chain(max(cur, imp_t[i]), sid, s, i, ctx)
            out.extend(chain)
        acted = list(clicked)
        if not clicked and rnd() < 0.35:
            i = rng.randrange(min(3, s.kk))
            acted.append(i)
            skip_t = imp_t[i] + self._lognorm_ms(rng, 1500, 0.5, HUMAN_MIN_CLICK_LATENCY_MS, 20_000)
            out.append((skip_t, SKIP, sid, s.rid, ids[s.items[i]], None, ctx))
        lost = [ids[s.items[i]] for i in acted if rnd() < self.p_lost_imp]
        if lost:  # the impression was lost upstream: its outcomes arrive without it
            out = [e for e in out if not (e[1] is IMPRESSION and e[4] in lost)]
        out.sort(key=itemgetter(0))
        return out

    def _clicked(self, a, items):
        """Slate indexes clicked (at most 3): relevance (genre match) times examination by position."""
        q, g, exam, rnd = self.quality, a.genre, self.exam, self.rnd
        return [
            i for i in range(len(items)) if rnd() < q[items[i]] * (3.0 if self.genre[items[i]] == g else 0.8) * exam[i]
        ][:3]

    def _click_chain(self, after, sid, s, i, ctx):
        """Click, view and dwell on position i + 1, sometimes add_to_cart and a purchase: (events, when the
        user moved on)."""
        rng, rnd = self.rng, self.rnd
        item = self.item_ids[s.items[i]]
        click_t = after + self._lognorm_ms(rng, 3000, 0.6, HUMAN_MIN_CLICK_LATENCY_MS, 60_000)
        view_t = click_t + rng.randint(150, 900)
        out = [
            (click_t, CLICK, sid, s.rid, item, {"position": i + 1}, ctx),
            (view_t, VIEW, sid, s.rid, item, None, ctx),
        ]
        dwell = self._lognorm_ms(rng, 25_000, 1.0, 500, 900_000)
        leave = view_t + dwell
        cart = rnd() < 0.15
        if cart:
            out.append((view_t + int(dwell * (0.3 + 0.6 * rnd())), ADD_TO_CART, sid, s.rid, item, None, ctx))
        out.append((leave, DWELL, sid, s.rid, item, {"dwell_ms": dwell}, ctx))
        if cart and rnd() < 0.35:
            bought = leave + self._lognorm_ms(rng, 40_000, 0.7, 3000, 600_000)
            qty = 1 if rnd() < 0.85 else 2
            out.append((bought, PURCHASE, sid, s.rid, item, {"value": round(self.price[s.items[i]] * qty, 2)}, ctx))
            return out, bought
        return out, leave

    # -- bots --
    def _sustained(self, a, t0, dur_ms, rate):
        """3-8 events/s for dur_ms: impressions, then clicks/views/scrolls >= 1 s later."""
        rng, rnd, ids = self.rng, self.rnd, self.item_ids
        sid = f"s{self.bits(48):012x}"
        step = 1000.0 / rate
        t, end = float(t0), t0 + dur_ms
        while t < end:
            s = self._slate(a, explore=False)
            ti = int(t)
            for i in range(s.kk):
                yield self._impression(ti, sid, s, i)
            t += max(1000.0, s.kk * step)
            for _ in range(rng.randint(2, 6)):
                i = rng.randrange(s.kk)
                kind = rng.choice((CLICK, CLICK, VIEW, VIEW, SCROLL, DWELL))
                extra = (
                    {"position": i + 1}
                    if kind is CLICK
                    else {"dwell_ms": rng.randint(200, 3000)}
                    if kind is DWELL
                    else None
                )
                yield (int(t), kind, sid, s.rid, ids[s.items[i]], extra, None)
                t += step * (0.5 + rnd())

    def _superhuman(self, a, t0, n_sessions):
        """Human-like rate, every click 10-150 ms after its impression, >= 5 clicks a session."""
        rng, rnd, ids = self.rng, self.rnd, self.item_ids
        t = t0
        for _ in range(n_sessions):
            sid = f"s{self.bits(48):012x}"
            for _ in range(rng.randint(5, 12)):
                s = self._slate(a, kk_max=8)
                ctx = self._maybe_context(a)
                out, tt = [], t
                for i in range(s.kk):
                    tt += rng.randint(0, 3)
                    out.append(self._impression(tt, sid, s, i, ctx))
                for i in sorted(rng.sample(range(min(s.kk, 4)), rng.randint(1, 2))):
                    ct = out[i][0] + rng.randint(10, 150)
                    out.append((ct, CLICK, sid, s.rid, ids[s.items[i]], {"position": i + 1}, ctx))
                    if rnd() < 0.5:
                        out.append((ct + rng.randint(200, 900), VIEW, sid, s.rid, ids[s.items[i]], None, ctx))
                out.sort(key=itemgetter(0))
                yield from out
                t += 62_000 + rng.randint(0, 60_000)
            t += SESSION_GAP_MIN_MS + rng.randint(0, 3_600_000)

    def _crawler(self, a, t0, n_target):
        """A page fetch every 21-60 s: a view, often the recommendation impressions, a scroll."""
        rng, rnd, ids = self.rng, self.rnd, self.item_ids
        t, count = t0, 0
        while count < n_target:
            yield (t, VIEW, None, None, ids[self._items(1)[0]], None, None)
            count += 1
            tt = t + rng.randint(200, 1000)
            if rnd() < 0.6:
                s = self._slate(a, explore=False)
                for i in range(s.kk):
                    yield self._impression(tt, None, s, i)
                count += s.kk
                if rnd() < 0.3:
                    yield (tt + rng.randint(500, 3000), SCROLL, None, s.rid, ids[s.items[-1]], None, None)
                    count += 1
            t += rng.randint(21_000, 60_000)

    def _cadence(self, a, t0, dur_ms, period_ms):
        """A steady crawler: one page view every period_ms (3% jitter), no clicks, for dur_ms."""
        rng, ids = self.rng, self.item_ids
        t, end = float(t0), t0 + dur_ms
        while t < end:
            yield (int(t), VIEW if rng.random() < 0.8 else SCROLL, None, None, ids[self._items(1)[0]], None, None)
            t += period_ms * (1.0 + max(-0.1, min(0.1, rng.gauss(0.0, 0.03))))

    def _plan_bots(self):
        """Bot users with their start times, sized to the bot budget of each rule."""
        d_ms = self.k["duration_hours"] * 3_600_000
        lo, hi = self.start_ms + 0.03 * d_ms, self.start_ms + 0.6 * d_ms
        straddled = set()
        midnight = self._first_midnight_after(self.start_ms)
        out = []
        for rule, args in self._bot_sizes():
            a = self._new_actor(rule)
            t0 = int(self.rng.uniform(lo, hi))
            if rule not in straddled and rule != C.BOT_RULE_CRAWLER_UA:
                straddled.add(rule)
                t0 = self._straddling_start(rule, args, lo, hi, midnight)
            out.append((a, self._bot_events(a, rule, t0, args)))
        return out

    def _bot_sizes(self):
        """(rule, generator arguments) of each bot user, together filling each rule's share of the budget."""
        rng, k = self.rng, self.k
        budget = k["bot_fraction"] * self.n
        split = k["bot_rule_split"]
        plans = []
        rem = budget * split.get(C.BOT_RULE_SUSTAINED_RATE, 0)
        while rem >= 270:  # nominal 3.3-7.5/s keeps the measured rate within 3-8/s
            rate, minutes = rng.uniform(3.3, 7.5), rng.uniform(3.05, 19.9)
            if rate * minutes * 60 > rem:
                minutes = max(3.05, rem / (rate * 60))
                rate = max(3.3, min(rate, rem / (minutes * 60)))
            rem -= rate * minutes * 60
            plans.append((C.BOT_RULE_SUSTAINED_RATE, (int(minutes * 60_000), rate)))
        # Steady crawlers: always at least one (3-10 min at 0.7-1.6 s per view), however small N (then
        # the bot share is a little over bot_fraction).
        cad = budget * split.get(C.BOT_RULE_MACHINE_CADENCE, 0)
        first = True
        while first or cad >= 180:
            period, minutes = rng.uniform(700, 1600), rng.uniform(3.05, 10.0)
            if first and cad < 120:
                period = rng.uniform(1500, 1600)  # the smallest steady crawler: ~115 events
            first = False
            minutes = max(3.05, min(minutes, cad * period / 60_000))
            cad -= minutes * 60_000 / period
            plans.append((C.BOT_RULE_MACHINE_CADENCE, (int(minutes * 60_000), period)))
        # a minimum-size sustained bot can overshoot its share (small N): take it from the others
        others = split.get(C.BOT_RULE_CRAWLER_UA, 0) + split.get(C.BOT_RULE_SUPERHUMAN_CLICKS, 0)
        scale = max(0.0, 1.0 + min(0.0, rem) / (budget * others)) if others and budget else 1.0
        rem = budget * split.get(C.BOT_RULE_CRAWLER_UA, 0) * scale
        while rem >= 15:
            n = min(rng.randint(30, 400), int(rem))
            rem -= n
            plans.append((C.BOT_RULE_CRAWLER_UA, (n,)))
        rem = budget * split.get(C.BOT_RULE_SUPERHUMAN_CLICKS, 0) * scale
        while rem >= 35:
            s = max(1, min(rng.randint(1, 3), int(rem / 70)))
            rem -= 70 * s
            plans.append((C.BOT_RULE_SUPERHUMAN_CLICKS, (s,)))
        return plans

    def _straddling_start(self, rule, args, lo, hi, midnight):
        """A start time that puts the first run of a rule's bots across a clock boundary."""
        rng = self.rng
        if rule == C.BOT_RULE_MACHINE_CADENCE:  # across the first midnight (and its hour)
            boundary, span = midnight, args[0]
        else:  # across an hour boundary in the bot window
            boundary = -(-int(rng.uniform(lo, hi)) // 3_600_000) * 3_600_000
            span = args[0] if rule == C.BOT_RULE_SUSTAINED_RATE else 5 * 62_000
        return max(self.start_ms, boundary - int(rng.uniform(0.2, 0.8) * span))

    def _bot_events(self, a, rule, t0, args):
        """The event generator of a bot user (crawlers get their user agent and client here)."""
        if rule == C.BOT_RULE_SUSTAINED_RATE:
            return self._sustained(a, t0, *args)
        if rule == C.BOT_RULE_MACHINE_CADENCE:
            return self._cadence(a, t0, *args)
        if rule == C.BOT_RULE_SUPERHUMAN_CLICKS:
            a.rid_always, a.sid_keep = True, 1.0
            return self._superhuman(a, t0, *args)
        a.ua = self._crawler_agent()
        a.variant, a.policy, a.v1, a.sid_keep, a.consent_p = None, RANKER_V3, False, 0.0, 0.0
        return self._crawler(a, t0, *args)

    def _first_midnight_after(self, ms):
        return (ms // 86_400_000 + 1) * 86_400_000

    def _plan_boundary_humans(self):
        """Two human users whose first session starts 1-10 min before a clock boundary: the first UTC
        midnight after the start, and an hour boundary within the bot window."""
        rng, k = self.rng, self.k
        d_ms = k["duration_hours"] * 3_600_000
        hour = -(-int(self.start_ms + rng.uniform(0.03, 0.6) * d_ms) // 3_600_000) * 3_600_000
        out = []
        for boundary in (self._first_midnight_after(self.start_ms), hour):
            a = self._new_actor()
            out.append((a, self._boundary_human(a, boundary)))
        return out

    def _boundary_human(self, a, boundary):
        """A human whose first session has the boundary strictly inside it (between two of its events,
        none before the start), then more sessions as usual."""
        rng = self.rng
        events = self._human_session(a, 0)
        times = sorted({e[0] for e in events})
        shift = self.start_ms - times[0]
        if len(times) >= 2:
            i = max(1, len(times) // 2)
            lo_t, hi_t = times[i - 1], times[i]
            shift = max(shift, boundary - hi_t + rng.randint(0, hi_t - lo_t - 1))
        events = [(e[0] + shift,) + e[1:] for e in events]
        yield from events
        t = events[-1][0] + SESSION_GAP_MIN_MS + int(rng.expovariate(1 / (2.5 * 3_600_000)))
        yield from self._human(a, t)

    # -- emission --
    def _emit(self, a, ev):
        """One logical event -> one record (maybe malformed) plus retried copies into the buffer."""
        ms = ev[0]
        d = self._record(a, ev)
        if a.malformable and self.rnd() < self.p_malformed and self._emit_dead_letter(a, ev, d):
            return
        if not self.avro and self.rnd() < self.p_iso:
            d["event_time"] = _iso(ms, a.tz[1], a.tz[0])
        payload = d if self.avro else orjson.dumps(d)
        eid = d["event_id"]
        delay = self._delay(a, ev)
        if delay >= 120_000:
            self.late_ids[eid] = delay / 1000.0
        arrival = ms + delay
        self._push(arrival, payload)
        if self.tmin is None:
            self.tmin = ms
        self.tmax = ms
        if not a.consent:  # duplicate_fraction re-delivers consenting events only
            self.counts[C.OUTCOME_CONSENT_DROPPED] += 1
            self.consent_ids.append(eid)
            return
        self._account(a, ev, d, delay > self.lateness_ms, arrival)
        if self.rnd() < self.p_dup:
            self._emit_copies(eid, payload, ms, arrival)

    def _record(self, a, ev):
        """The well-formed record of one event; draws decide which optional fields it carries."""
        ms, etype, sid, rid, item, extra, ctx = ev
        rnd = self.rnd
        d = {"event_id": self._uuid(), "event_type": etype, "event_time": ms, "user_id": a.uid}
        if sid is not None and rnd() < a.sid_keep:
            d["session_id"] = sid
        if rid is not None and (etype is IMPRESSION or a.rid_always or rnd() >= self.p_omit_rid):
            d["request_id"] = rid
        if item is not None:
            d["item_id"] = item
        if extra is not None:
            d.update(extra)
        if a.variant is not None:
            d["experiment_id"] = EXPERIMENT_ID
            d["variant"] = a.variant
        if ctx is not None:
            d["context"] = ctx
        d["user_agent"] = a.ua
        d["ip"] = a.ip
        if not a.consent:
            d["consent"] = False
        elif rnd() < a.consent_p:
            d["consent"] = True
        if a.v1:
            d["schema_version"] = 1
        elif self.avro or rnd() < 0.5:
            d["schema_version"] = 2
        return d

    def _next_reason(self):
        """The dead-letter reason due: each reason once per shuffled cycle, kept until an event can carry it."""
        if self.pending_reason is None:
            if not self.reason_cycle:
                self.reason_cycle = list(self.reasons)
                self.rng.shuffle(self.reason_cycle)
            self.pending_reason = self.reason_cycle.pop()
        return self.pending_reason

    def _emit_dead_letter(self, a, ev, d):
        """Emit the event as a dead letter of the reason due; False if it cannot carry that defect."""
        ms, etype, _, rid, item, _, _ = ev
        reason = self._next_reason()
        payload = self._defect(reason, d, a, ms)
        if payload is None:
            return False
        self.counts[C.OUTCOME_DEAD_LETTER] += 1
        self.dl_reason[reason] += 1
        self.pending_reason = None
        if etype is IMPRESSION:
            a.imps[rid, item] = (CAUSE_DEAD_LETTER, ms)
        self._push(
            ms + self._lognorm_ms(self.rng, 1000, 0.8, 0, 60_000),
            payload,
            reason not in (C.MALFORMED_JSON, C.NOT_AN_OBJECT),
        )
        return True

    def _delay(self, a, ev):
        """Arrival minus event time (ms): seconds mostly, minutes or hours when late; a stalled outcome
        arrives around its impression's label deadline."""
        ms, etype, _, rid, item, _, _ = ev
        rnd = self.rnd
        r = rnd()
        if r >= self.p_any_late or a.rule == C.BOT_RULE_SUPERHUMAN_CLICKS:
            delay = min(int(1000.0 * math.exp(0.8 * self.gauss(0.0, 1.0))), 60_000)
        elif r < self.p_very_late:
            delay = self.rng.randint(3 * 3_600_000, 12 * 3_600_000)
        else:
            delay = self.rng.randint(2 * 60_000, 90 * 60_000)
        if a.imps is not None and etype in LABEL_OUTCOME_TYPES and rnd() < self.p_stall:
            shown = a.imps.get((rid, item))
            u = rnd()
            if shown is not None:  # stuck in the client's upload queue until about the label deadline
                gap = max(1000, ms - shown[1])
                lo = shown[1] + self.label_span_ms - gap
                hi = max(lo, ms + self.lateness_ms + gap)
                delay = max(delay, lo + int(u * (hi - lo)) - ms)
        return delay

    def _account(self, a, ev, d, past_lateness, arrival):
        """Count the first copy of a consenting event under its outcome; keep what the label truth needs."""
        ms, etype, _, rid, item, _, _ = ev
        eid = d["event_id"]
        if self.arrival_field is not None and past_lateness:
            self.counts[C.OUTCOME_TOO_LATE] += 1
            self.too_late_ids.append(eid)
            if a.rule is None and etype is IMPRESSION:
                a.imps[rid, item] = (CAUSE_TOO_LATE, ms)
        elif a.rule is not None:
            self.counts[C.OUTCOME_BOT] += 1
            self.bot_rule_counts[a.rule] += 1
            self.bot_event_ids.append(eid)
            self.bot_ids_by_rule[a.rule].append(eid)
            self.bot_user_ids.add(a.uid_str)
        else:
            self.counts[C.OUTCOME_VALID] += 1
            self.valid_by_type[etype] += 1
            if item is not None:
                self._keep_for_labels(a, ev, d, arrival)

    def _keep_for_labels(self, a, ev, d, arrival):
        """Keep a valid human event on an item for the label truth: an impression, or an outcome with the
        cause it counts for (its impression's event id, or why that impression never reaches the labels)."""
        ms, etype, _, rid, item, _, _ = ev
        eid = d["event_id"]
        if etype is IMPRESSION:
            a.imps[rid, item] = (eid, ms)
            cause = None
        elif etype in LABEL_OUTCOME_TYPES:
            cause = a.imps.get((rid, item), (CAUSE_LOST,))[0]
        else:
            return
        seen = arrival if self.arrival_field is not None else None
        a.lab.setdefault(item, []).append((ms, eid, etype, d.get("request_id"), seen, d.get("dwell_ms"), cause))

    def _emit_copies(self, eid, payload, ms, arrival):
        """1-3 retried deliveries of a record; with arrival times, a copy past the lateness is too_late."""
        r = self.rnd()
        extra_copies = min(1 if r < 0.6 else 2 if r < 0.9 else 3, self.n - self.lines)
        dups = 0
        for _ in range(extra_copies):
            # strictly after the first copy, same event time: once the first is too late, all are
            copy_arrival = arrival + self._lognorm_ms(self.rng, 20_000, 1.2, 1000, 900_000)
            self._push(copy_arrival, payload)
            if self.arrival_field is not None and copy_arrival - ms > self.lateness_ms:
                self.counts[C.OUTCOME_TOO_LATE] += 1
                self.too_late_ids.append(eid)
            else:
                dups += 1
        if dups:
            self.dup_ids[eid] = dups
            self.counts[C.OUTCOME_DUPLICATE] += dups

    def _push(self, arrival, payload, is_object=True):
        self.seq += 1
        self.lines += 1
        if self.env_prefix is not None and is_object:
            assert payload[:1] == b"{", payload[:40]
            payload = b"%s%d,%s" % (self.env_prefix, arrival, payload[1:])
        heapq.heappush(self.arrivals, (arrival, self.seq, payload))

    # -- labels --
    @staticmethod
    def _label_acc():
        return {
            "exposures": 0,
            "positives": 0,
            "negatives": 0,
            "positive_label_ids": [],
            "by_outcome": dict.fromkeys(BY_OUTCOME, 0),
            "orphan_outcomes": 0,
            "late_outcomes": 0,
        }

    @staticmethod
    def _label_of(outcomes):
        """(label, outcome types) of one exposure from the outcomes counting for it (as make_label)."""
        types = frozenset(o[2] for o in outcomes)
        if CLICK in types and LABEL_MIN_CLICK_DWELL_MS > 0:
            dwell = max((o[5] for o in outcomes if o[5] is not None), default=None)
            if (dwell or 0) < LABEL_MIN_CLICK_DWELL_MS:
                return any(t in LABEL_POSITIVE for t in types - {CLICK}), types
        return any(t in LABEL_POSITIVE for t in types), types

    def _settle_labels(self, a):
        """Settle one finished human user: rule-based labels (as transforms.labels.settle with
        now=+inf) and the intended labels from each outcome's cause, into the accumulators."""
        for recs in a.lab.values():
            self._settle_item(recs)
        a.lab = None
        a.imps = None

    def _settle_item(self, recs):
        """Labels of one user's exposures of one item, by rule and by intent."""
        span = self.label_span_ms
        R, I = self.lab_rule, self.lab_intent
        exps = sorted((r for r in recs if r[2] is IMPRESSION), key=itemgetter(0, 1))
        times = [x[0] for x in exps]
        exp_time = {x[1]: x[0] for x in exps}
        by_rule = {x[1]: [] for x in exps}
        by_cause = {x[1]: [] for x in exps}
        for o in recs:
            if o[2] is IMPRESSION:
                continue
            t, rid, arr, cause = o[0], o[3], o[4], o[6]
            match = _attributed(exps, times, t, rid)
            if match is None:
                R["orphan_outcomes"] += 1
            elif arr is not None and arr > exp_time[match] + span:
                R["late_outcomes"] += 1
            else:
                by_rule[match].append(o)
            if cause in exp_time:
                if arr is not None and arr > exp_time[cause] + span:
                    I["late_outcomes"] += 1
                else:
                    by_cause[cause].append(o)
            else:
                I["orphan_outcomes"] += 1
                I["orphans_by_cause"][cause] += 1
                cause = None
            if match != cause:
                I["ambiguous"][_ambiguity(cause, t, rid, exp_time)] += 1
        for x in exps:
            xid = x[1]
            rule_label = self._label_of(by_rule[xid])
            cause_label = self._label_of(by_cause[xid])
            _count_label(R, xid, rule_label)
            _count_label(I, xid, cause_label)
            if rule_label != cause_label:
                I["ambiguous_label_ids"].append(xid)

    def _labels_truth(self):
        out = []
        for acc in (self.lab_rule, self.lab_intent):
            t = dict(acc)
            t["negatives"] = t["exposures"] - t["positives"]
            t["positive_label_ids"] = sorted(t["positive_label_ids"])
            t["by_outcome"] = dict(t["by_outcome"])
            if "ambiguous_label_ids" in t:
                t["orphans_by_cause"] = dict(t["orphans_by_cause"])
                t["ambiguous"] = dict(t["ambiguous"])
                t["ambiguous_label_ids"] = sorted(t["ambiguous_label_ids"])
            out.append(t)
        return out

    # -- malformed records --
    def _defect(self, reason, d, a, ms):
        """The record with exactly one defect of ``reason``, or None if this event cannot carry it."""
        d = dict(d)
        if not self.avro:
            d["event_time"] = _iso(ms, a.tz[1], a.tz[0]) if self.rng.random() < 0.6 else ms
        if reason in _FIELD_DEFECTS:  # a bad value in a well-formed record: Avro can carry these
            if _FIELD_DEFECTS[reason](self, d, ms) is False:
                return None
            return d if self.avro else orjson.dumps(d)
        if self.avro:
            return d
        if reason not in _RECORD_DEFECTS:
            raise AssertionError(reason)
        return _RECORD_DEFECTS[reason](self, d, a, ms)

    def _bad_timestamp(self, d, ms):
        rng = self.rng
        v = rng.randrange(2 if self.avro else 5)
        if v == 0:  # epoch seconds by mistake (January 1970 as milliseconds)
            d["event_time"] = ms // 1000
        elif v == 1:  # far future
            future = ms + 73 * 365 * 86_400_000
            d["event_time"] = future if (self.avro or rng.random() < 0.5) else _iso(future)
        elif v == 2:
            d["event_time"] = "yesterday"
        elif v == 3:
            d["event_time"] = rng.choice(("2026-13-45T99:00:00Z", "2026-02-30T10:00:00Z", "01/11/2026 10:00"))
        else:  # ISO without an offset
            d["event_time"] = _iso(ms, 0, "")

    def _unknown_event_type(self, d, ms):
        d["event_type"] = self.rng.choice(("hover", "CLICK ", "like", "Click", "share"))

    def _out_of_range(self, d, ms):
        """A number outside its range; False for an event type with no ranged field."""
        rng, etype = self.rng, d["event_type"]
        if etype is IMPRESSION:
            v = rng.randrange(4)
            if v == 3:
                d["position"] = -1
            else:
                d["propensity"] = (0.0, -0.25, 1.5)[v]
        elif etype is CLICK:
            d["position"] = -rng.randint(1, 3)
        elif etype is DWELL:
            d["dwell_ms"] = -rng.randint(1, 5000)
        elif etype is PURCHASE:
            d["value"] = -d["value"] if d.get("value") else -9.99
        else:
            return False
        return True

    def _missing_field(self, d, a, ms):
        del d[self.rng.choice(C.REQUIRED_FIELDS)]
        return orjson.dumps(d)

    def _wrong_type(self, d, a, ms):
        v = self.rng.randrange(len(_WRONG_TYPES))
        if v == _WRONG_TYPE_V2_ONLY and a.v1:
            v = len(_WRONG_TYPES) - 1
        field, value = _WRONG_TYPES[v]
        d[field] = value(self.rng)
        return orjson.dumps(d)

    def _schema_violation(self, d, a, ms):
        rng = self.rng
        v = rng.randrange(3)
        if v == 0:
            d["foo"] = 1
        elif v == 1 and a.v1:  # a v2 field in a v1 record
            if rng.random() < 0.5:
                d["context"] = {"page": "home"}
            else:
                d["experiment_id"] = EXPERIMENT_ID
        else:
            d["schema_version"] = 99
        return orjson.dumps(d)

    def _not_an_object(self, d, a, ms):
        rng = self.rng
        v = rng.randrange(4)
        if v == 0:
            return orjson.dumps([d])
        if v == 1:
            return orjson.dumps(d["event_id"])
        if v == 2:
            return str(rng.randint(1, 10**6)).encode()
        return orjson.dumps([d["event_type"], ms, d["user_id"]])

    @staticmethod
    def _v2_context(d):
        """A copy of the record's context (made v2 if needed: context exists only in v2) to spoil."""
        if d.get("schema_version") == 1:
            d["schema_version"] = 2
        return dict(d.get("context") or {"page": "search"})

    def _bad_encoding(self, d, a, ms):
        ctx = self._v2_context(d)
        ctx["search_query"] = self.rng.choice(("café", "crème", "résumé template"))
        d["context"] = ctx
        return orjson.dumps(d).replace("é".encode(), "é".encode("latin-1")).replace("è".encode(), "è".encode("latin-1"))

    def _oversize_payload(self, d, a, ms):
        ctx = self._v2_context(d)
        ctx["dom_snapshot"] = ("<div class=card>lorem ipsum dolor sit amet</div>" * 1000)[
            : self.rng.randint(OVERSIZE_BYTES + 500, OVERSIZE_BYTES + 20_000)
        ]
        d["context"] = ctx
        return orjson.dumps(d)

    def _malformed_json(self, d, a, ms):
        rng = self.rng
        s = orjson.dumps(d).decode()
        v = rng.randrange(4)
        if v == 0:
            s = s.replace('":', '"=', 1)
        elif v == 1:
            s = s[:-1] + ",}"
        elif v == 2:
            s = "{" + s[1:].replace('"', "'")
        else:
            s = s[: rng.randint(len(s) // 3, len(s) - 2)]
        try:
            orjson.loads(s)
            s = s[: len(s) // 2]  # still parsed somehow: truncate instead
        except orjson.JSONDecodeError:
            pass
        return s.encode()

    # -- main loop --
    def run(self):
        """Yield the records (bytes or Avro dicts) in arrival order."""
        k, rng = self.k, self.rng
        n = self.n
        sched = []  # (event_ms, seq, event, actor, generator)
        sseq = 0
        for a, gen in self._plan_bots() + self._plan_boundary_humans():
            ev = next(gen, None)
            if ev is not None:
                sseq += 1
                sched.append((ev[0], sseq, ev, a, gen))
        heapq.heapify(sched)
        human_budget = n * (1.0 - k["bot_fraction"])
        d_ms = k["duration_hours"] * 3_600_000
        mean_gap = d_ms * _EVENTS_PER_HUMAN / max(1.0, human_budget)
        next_user = self.start_ms + rng.expovariate(1 / mean_gap)
        arrivals = self.arrivals
        pop, push = heapq.heappop, heapq.heappush
        while self.lines < n:
            if sched and sched[0][0] <= next_user:
                ms, _, ev, a, gen = pop(sched)
                self._emit(a, ev)
                nxt = next(gen, None)
                if nxt is not None:
                    sseq += 1
                    push(sched, (nxt[0], sseq, nxt, a, gen))
                elif a.lab:
                    self._settle_labels(a)  # a finished user: nothing of theirs can change
            else:
                t = int(next_user)
                next_user += rng.expovariate(1 / mean_gap)
                a = self._new_actor()
                gen = self._human(a, t)
                ev = next(gen)
                sseq += 1
                push(sched, (ev[0], sseq, ev, a, gen))
                continue
            while arrivals and arrivals[0][0] <= ms:
                yield pop(arrivals)[2]
        while arrivals:
            yield pop(arrivals)[2]
        for _, _, _, a, _ in sorted(sched, key=itemgetter(0, 1)):
            if a.lab:
                self._settle_labels(a)  # users cut off by the record budget
        cut = sorted({a.uid_str for _, _, _, a, _ in sched if a.rule not in (None, C.BOT_RULE_CRAWLER_UA)})
        if cut:  # the record budget ran out mid-run: a detector may not see these as bots
            print(
                f"warning: bot users {cut} were cut off by the end of the stream "
                f"(raise duration_hours or lower --events)",
                file=sys.stderr,
            )

    def truth(self):
        c = self.counts
        assert sum(c.values()) == self.lines, (c, self.lines)
        labels, intended = self._labels_truth()
        return {
            "seed": self.seed,
            "input_records": self.lines,
            "arrival_field": self.arrival_field,
            "lateness_s": self.lateness_s,
            "counts": dict(c),
            "dead_letter_by_reason": dict(self.dl_reason),
            "bots_by_rule": dict(self.bot_rule_counts),
            "bot_event_ids": sorted(self.bot_event_ids),
            "bot_user_ids": sorted(self.bot_user_ids),
            "bot_event_ids_by_rule": {r: sorted(v) for r, v in self.bot_ids_by_rule.items()},
            "duplicate_event_ids": dict(sorted(self.dup_ids.items())),
            "consent_dropped_event_ids": sorted(self.consent_ids),
            "too_late_event_ids": sorted(self.too_late_ids),
            "valid_event_count_by_type": dict(self.valid_by_type),
            "late_event_ids": dict(sorted(self.late_ids.items())),
            "event_time_range": [_iso(self.tmin), _iso(self.tmax)] if self.tmin is not None else [None, None],
            "labels": labels,
            "labels_intended": intended,
        }


# Defects that keep the record well-formed, one bad value: fn(sim, record, ms) spoils the record in
# place and returns False when the event has no field for it.
_FIELD_DEFECTS = {
    C.BAD_TIMESTAMP: _Sim._bad_timestamp,
    C.UNKNOWN_EVENT_TYPE: _Sim._unknown_event_type,
    C.OUT_OF_RANGE: _Sim._out_of_range,
}
# Defects of the record as a whole (JSON formats only): fn(sim, record, actor, ms) -> the payload.
_RECORD_DEFECTS = {
    C.MISSING_FIELD: _Sim._missing_field,
    C.WRONG_TYPE: _Sim._wrong_type,
    C.SCHEMA_VIOLATION: _Sim._schema_violation,
    C.NOT_AN_OBJECT: _Sim._not_an_object,
    C.BAD_ENCODING: _Sim._bad_encoding,
    C.OVERSIZE_PAYLOAD: _Sim._oversize_payload,
    C.MALFORMED_JSON: _Sim._malformed_json,
}
# wrong_type: (field, rng -> a value of the wrong type), drawn uniformly; v1 records have no context,
# so they take the last entry instead of it.
_WRONG_TYPES = (
    ("position", lambda rng: rng.choice(("third", "1st"))),
    ("consent", lambda rng: rng.choice(("yes", "true", 1))),
    ("dwell_ms", lambda rng: "long"),
    ("context", lambda rng: ["a"]),
    ("user_id", lambda rng: {"id": 1}),
    ("user_id", lambda rng: True),
    ("propensity", lambda rng: "high"),
    ("value", lambda rng: "12.99 USD"),
)
_WRONG_TYPE_V2_ONLY = [field for field, _ in _WRONG_TYPES].index("context")


def _attributed(exps, times, t, rid):
    """The exposure id an outcome at ``t`` is attributed to, as transforms.labels.attribute does, or None."""
    if rid is not None:
        for x in reversed(exps):
            if x[3] == rid and x[0] - LABEL_CLOCK_SKEW_MS <= t <= x[0] + LABEL_WINDOW_MS:
                return x[1]
        return None
    i = bisect_right(times, t)
    if i and t - times[i - 1] <= LABEL_WINDOW_MS:
        return exps[i - 1][1]
    return None


def _ambiguity(cause, t, rid, exp_time):
    """Why the rule attributed an outcome elsewhere than its cause (one of AMBIGUOUS_KINDS)."""
    if cause is not None and t > exp_time[cause] + LABEL_WINDOW_MS:
        return "outcome_beyond_window"
    if cause is None and rid is None:
        return "attributed_to_other_exposure"
    return "other"


def _count_label(acc, xid, label):
    """Add exposure ``xid`` with its (positive, outcome types) label to a label accumulator."""
    positive, types = label
    acc["exposures"] += 1
    if positive:
        acc["positives"] += 1
        acc["positive_label_ids"].append(xid)
    for k in BY_OUTCOME:
        if k in types:
            acc["by_outcome"][k] += 1


def _pace_ok(rec_all, rec_non, req, shift):
    """Would appending ``req`` (shifted) keep every 60 s window within the human limits?"""
    all_t, non_t = list(rec_all), list(rec_non)
    for e in req:
        t = e[0] + shift
        all_t.append(t)
        if len(all_t) - bisect_left(all_t, t - 60_000) > HUMAN_MAX_EVENTS_PER_MIN:
            return False
        if e[1] is not IMPRESSION:
            non_t.append(t)
            if len(non_t) - bisect_left(non_t, t - 60_000) > HUMAN_MAX_NON_IMPRESSION_PER_MIN:
                return False
    return True


# --- public API ----------------------------------------------------------------------------------


def _check_options(arrival_field, lateness_s, knobs):
    if arrival_field is not None:
        if not isinstance(arrival_field, str) or not arrival_field.strip():
            raise ValueError(f"arrival_field must be a non-empty field name, got {arrival_field!r}")
        if arrival_field in C.REQUIRED_FIELDS or arrival_field in C.OPTIONAL_FIELDS:
            raise ValueError(f"arrival_field {arrival_field!r} is an event field; pick another name")
    if isinstance(lateness_s, bool) or not isinstance(lateness_s, (int, float)) or not lateness_s > 0:
        raise ValueError(f"lateness_s must be a number of seconds > 0, got {lateness_s!r}")
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f"unknown knob(s): {sorted(unknown)}; known: {sorted(DEFAULT_KNOBS)}")


def _write_avro(records, output_path, seed):
    """Deflate-compressed Avro; the sync marker comes from the seed so that the bytes repeat."""
    import fastavro

    schema = _load_avro_schema()
    marker = random.Random(f"{seed}-sync").getrandbits(128).to_bytes(16, "big")
    with open(output_path, "wb") as f:
        fastavro.writer(f, schema, records, codec="deflate", sync_marker=marker)


def _write_lines(lines, output_path, gzipped):
    """One record a line, written in blocks; gzip without a file name and with mtime 0 so that the bytes repeat."""
    with open(output_path, "wb", buffering=1 << 20) as raw:
        out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=5) if gzipped else raw
        try:
            write, buf = out.write, []
            for line in lines:
                buf.append(line)
                if len(buf) >= 4096:
                    buf.append(b"")
                    write(b"\n".join(buf))
                    buf = []
            if buf:
                buf.append(b"")
                write(b"\n".join(buf))
        finally:
            if out is not raw:
                out.close()


def generate(
    n_events,
    output_path,
    seed=42,
    start=DEFAULT_START,
    fmt=None,
    arrival_field=None,
    lateness_s=DEFAULT_LATENESS_S,
    **knobs,
) -> dict:
    """Write ``n_events`` records to ``output_path`` and ``<output_path>.truth.json``; return the truth.

    ``n_events`` is exact: the file holds that many records (lines / Avro records).
    ``arrival_field``: stamp each JSON-object record with its arrival time (epoch ms) under this
    top-level name; then events arriving more than ``lateness_s`` after their event time are too_late.
    The same seed gives the same events with or without it (only the envelope differs).
    """
    _check_options(arrival_field, lateness_s, knobs)
    n_events = int(n_events)
    if n_events < 0:
        raise ValueError("n_events must be >= 0")
    fmt = fmt or _infer_format(output_path)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not one of {FORMATS}")
    k = {**DEFAULT_KNOBS, **knobs}
    sim = _Sim(n_events, seed, _parse_start(start), fmt, k, arrival_field, lateness_s)
    output_path = str(output_path)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    if fmt == "avro":
        _write_avro(sim.run(), output_path, seed)
    else:
        _write_lines(sim.run(), output_path, gzipped=fmt == "jsonl.gz")
    truth = sim.truth()
    with open(output_path + ".truth.json", "wb") as f:
        f.write(orjson.dumps(truth, option=orjson.OPT_INDENT_2))
    return truth


def _knob_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m feedback_tools.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, required=True, help="exact number of records to write")
    p.add_argument("--output", required=True, help="output file (.jsonl, .jsonl.gz or .avro)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--start", default=DEFAULT_START, help="ISO-8601 start of the traffic")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: from the extension")
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"override a proportion (JSON value); known: {', '.join(DEFAULT_KNOBS)}",
    )
    p.add_argument(
        "--arrival-field",
        default=None,
        metavar="NAME",
        help="stamp each JSON record with its arrival time (epoch ms) in this top-level field "
        "(ignored for Avro); events later than --lateness are then too_late",
    )
    p.add_argument(
        "--lateness",
        type=float,
        default=DEFAULT_LATENESS_S,
        metavar="SECONDS",
        help="too-late limit (and label lateness) assumed by the truth; match the job's time.lateness",
    )
    args = p.parse_args(argv)
    knobs = {}
    for kv in args.knob:
        name, sep, value = kv.partition("=")
        if not sep:
            p.error(f"--knob needs NAME=VALUE, got {kv!r}")
        knobs[name.strip()] = _knob_value(value)
    t0 = time.perf_counter()
    try:
        truth = generate(
            args.events,
            args.output,
            seed=args.seed,
            start=args.start,
            fmt=args.format,
            arrival_field=args.arrival_field,
            lateness_s=args.lateness,
            **knobs,
        )
    except (TypeError, ValueError) as e:
        p.error(str(e))
    dt = time.perf_counter() - t0
    c = truth["counts"]
    print(
        f"wrote {truth['input_records']} records to {args.output} in {dt:.1f}s "
        f"({truth['input_records'] / max(dt, 1e-9):,.0f}/s); "
        + ", ".join(f"{k} {v}" for k, v in c.items())
        + f"; truth: {args.output}.truth.json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    main()
