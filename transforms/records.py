"""The clean-event output schema: the latest input schema, minus the raw IP, plus what the pipeline adds."""

from __future__ import annotations

import copy

from transforms.schemas import SchemaRegistry


def _opt(name, avro_type, doc):
    return {"name": name, "type": ["null", avro_type], "default": None, "doc": doc}


_STRING_MAP = {"type": "map", "values": "string"}

ADDED_FIELDS = [
    _opt(
        "arrival_time",
        {"type": "long", "logicalType": "timestamp-millis"},
        "When the pipeline received the event (Pub/Sub publish time or the archive's record); null if unknown.",
    ),
    _opt("ip_hash", "string", "Keyed pseudonym (HMAC-SHA256) of the client IP."),
    _opt("ip_network", "string", "Client IP truncated to its network (e.g. 203.0.113.0/24)."),
    _opt("browser", "string", "Browser family from the user agent."),
    _opt("browser_version", "string", "Browser major version."),
    _opt("os", "string", "Operating-system family."),
    _opt("os_version", "string", "Operating-system major version."),
    _opt("device_class", "string", "desktop | mobile | tablet | tv | console | bot | unknown."),
    _opt("item_meta", _STRING_MAP, "Item metadata from the items side input (None: not found or none configured)."),
    _opt("user_meta", _STRING_MAP, "User metadata from the users side input."),
    _opt("experiment_meta", _STRING_MAP, "Experiment metadata from the experiments side input."),
    _opt("bot_rule", "string", "Bot rule that flagged the event (bots output only)."),
    _opt("bot_detail", "string", "Why the rule fired."),
]
REMOVED_FIELDS = ("ip",)


def clean_event_schema(registry: SchemaRegistry) -> dict:
    schema = copy.deepcopy(registry.latest.schema)
    schema["name"] = "CleanEvent"
    schema["doc"] = (
        f"A valid event after privacy, enrichment, dedupe and bot filtering (input schema v{registry.latest.version})."
    )
    schema["fields"] = [f for f in schema["fields"] if f["name"] not in REMOVED_FIELDS] + copy.deepcopy(ADDED_FIELDS)
    return schema
