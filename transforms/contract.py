"""The event contract: field names, the event-type vocabulary and the dead-letter reason codes.

Everything that producers, the generator and the pipeline must agree on lives here, so one
change cannot leave them disagreeing.
"""

REQUIRED_FIELDS = ("event_id", "event_type", "event_time", "user_id")

OPTIONAL_FIELDS = (
    "item_id",
    "request_id",
    "session_id",
    "position",
    "propensity",
    "policy",
    "experiment_id",
    "variant",
    "dwell_ms",
    "value",
    "user_agent",
    "ip",
    "consent",
    "context",
    "schema_version",
)

DEFAULT_EVENT_TYPES = (
    "impression",
    "click",
    "view",
    "dwell",
    "scroll",
    "skip",
    "add_to_cart",
    "purchase",
)

# Dead-letter reason codes. Stable strings: dashboards and replay tooling key on them.
MALFORMED_JSON = "malformed_json"
BAD_ENCODING = "bad_encoding"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
OUT_OF_RANGE = "out_of_range"
OVERSIZE_PAYLOAD = "oversize_payload"
SCHEMA_VIOLATION = "schema_violation"
CORRUPT_FILE = "corrupt_file"
TOO_LATE = "too_late"

REASON_CODES = (
    MALFORMED_JSON,
    BAD_ENCODING,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    BAD_TIMESTAMP,
    UNKNOWN_EVENT_TYPE,
    OUT_OF_RANGE,
    OVERSIZE_PAYLOAD,
    SCHEMA_VIOLATION,
    CORRUPT_FILE,
    TOO_LATE,
)

# Where every input record ends up: exactly one of these per record.
OUTCOME_VALID = "valid"
OUTCOME_DUPLICATE = "duplicates"
OUTCOME_BOT = "bots"
OUTCOME_DEAD_LETTER = "dead_letter"
OUTCOME_CONSENT_DROPPED = "consent_dropped"
OUTCOME_TOO_LATE = "too_late"
OUTCOMES = (
    OUTCOME_VALID,
    OUTCOME_DUPLICATE,
    OUTCOME_BOT,
    OUTCOME_DEAD_LETTER,
    OUTCOME_CONSENT_DROPPED,
    OUTCOME_TOO_LATE,
)

# Bot rules (the `bot_rule` field of a flagged event).
BOT_RULE_CRAWLER_UA = "crawler_user_agent"
BOT_RULE_SUSTAINED_RATE = "sustained_rate"
BOT_RULE_SUPERHUMAN_CLICKS = "superhuman_click_latency"
BOT_RULE_MACHINE_CADENCE = "machine_cadence"
BOT_RULES = (BOT_RULE_CRAWLER_UA, BOT_RULE_SUSTAINED_RATE, BOT_RULE_SUPERHUMAN_CLICKS, BOT_RULE_MACHINE_CADENCE)

# Counter names besides the outcomes: the `_counts` files hold them and the report's `labels` summary
# reads them. Stable strings, like the reason codes.
COUNTER_INPUT = "input"
COUNTER_EXPOSURES = "exposures"
COUNTER_LABELS = "labels"
COUNTER_LABELS_POSITIVE = "labels.positive"
COUNTER_LABELS_NEGATIVE = "labels.negative"
COUNTER_ORPHANS = "orphans"  # orphan outcomes (outputs.ORPHAN_OUTCOMES)
COUNTER_LATE_OUTCOMES = "late_outcomes"

# Tags of multi-output steps, shared by the steps that emit them and the graph that reads them.
TAG_EVENTS = "events"  # DedupeEvents: first sightings
TAG_HUMANS = "humans"  # FilterBots: events judged human
TAG_REST = "rest"  # FilterBots: events routed on without judging
TAG_LABELS = "labels"  # JoinLabels: settled labels

# Prefix of every Beam metric namespace of the project (reports list the metrics under it).
METRICS_PREFIX = "feedback."
