"""Per-event cost of privacy protection (PII scan + redaction + pseudonyms) on generated events.

    python -m benchmarks.pii_redaction [N]

Generates N events (feedback_tools.generate, fixed seed), parses them, then times `protect_event` on the
valid ones and `dead_letter` on the rejected ones, with a cold and a warm cache. Also lists the
values in which PII was found, to check for false positives (the generator puts e-mails and phone
numbers in ~6% of contexts and nowhere else).
"""

import collections
import datetime as dt
import gzip
import sys
import tempfile
import time

from feedback_tools.generate import generate
from transforms.config import config_from_dict
from transforms.deadletter import dead_letter
from transforms.parse import ConsentWithdrawn, Rejected, TooLate, ValidationRules, parse_record
from transforms.privacy import PrivacyRules, Pseudonymiser, Redactor, protect_event
from transforms.schemas import SchemaRegistry


def main(n: int = 20_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        generate(n, f"{tmp}/e.jsonl.gz", seed=3)
        lines = gzip.open(f"{tmp}/e.jsonl.gz").read().split(b"\n")[:n]
    cfg = config_from_dict({})
    rules = ValidationRules.from_config(
        cfg, SchemaRegistry.from_directory("config/schemas"), dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    )
    valid, rejected = [], []
    for line in lines:
        try:
            valid.append(parse_record(line, rules))
        except (Rejected, TooLate) as r:
            rejected.append((line, r))
        except ConsentWithdrawn:
            pass
    prules = PrivacyRules(("user_id", "session_id"), 24, 48)
    for label in ("cold cache", "warm cache"):
        if label == "cold cache":
            p, red = Pseudonymiser(b"k"), Redactor(b"k")
        t = time.perf_counter()
        for e in valid:
            protect_event(e, prules, p, red)
        per_valid = (time.perf_counter() - t) / len(valid) * 1e6
        t = time.perf_counter()
        for line, r in rejected:
            dead_letter("x", None, str(r), "parse", line, "f:1", red)
        per_dead = (time.perf_counter() - t) / max(1, len(rejected)) * 1e6
        print(
            f"{label}: {len(valid)} valid events {per_valid:.1f} us/event; "
            f"{len(rejected)} dead letters {per_dead:.1f} us/record"
        )
        found = collections.Counter()
        for (field, kind), c in red.found.items():
            found[field, kind] += c
        red.drain()
    print("PII found (field, kind):", dict(found))
    # where were findings outside context? (false positives would show here)
    red = Redactor(b"k")
    odd = collections.Counter()
    for e in valid:
        out = protect_event(e, prules, p, red)
        for k, v in out.items():
            if (
                k != "context"
                and isinstance(v, str)
                and ("[phone:" in v or "[email:" in v or "[ip:" in v or v.startswith("pii-"))
            ):
                odd[k, e[k] if k not in ("user_id", "session_id") else "?"] += 1
    print("findings outside context (possible false positives):", odd.most_common(10) or "none")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
