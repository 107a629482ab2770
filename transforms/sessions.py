"""Sessionization: a session_id for every event, by an inactivity gap per user.

Events that already carry a session_id keep it. The others get a deterministic id derived from the
(pseudonymised) user and the session's first event time, so batch and streaming agree.

There is no fixed event-time grid: a user's events are cut into continuous runs by the inactivity gap
alone, plus a cap on a run's length counted from its own first event (`split_runs`), so every
decision is the same whatever the clock time (shifting all times shifts nothing else).
"""

from __future__ import annotations

import hashlib


def bucket_of(event_time_ms: int, split_every_ms: int) -> int:
    return event_time_ms // split_every_ms


def split_by_gap(events: list[dict], gap_ms: int) -> list[list[dict]]:
    """Time-ordered events -> runs; a run ends where the next event is gap_ms or more after the last
    (as Beam's Sessions(gap) would merge them)."""
    runs: list[list[dict]] = []
    last = None
    for e in events:
        if last is None or e["event_time"] - last >= gap_ms:
            runs.append([])
        runs[-1].append(e)
        last = e["event_time"]
    return runs


def split_by_bucket(events: list[dict], split_every_ms: int) -> list[list[dict]]:
    """Time-ordered events -> one list per fixed event-time bucket (not used for decisions: see split_runs)."""
    out: dict[int, list[dict]] = {}
    for e in events:
        out.setdefault(bucket_of(e["event_time"], split_every_ms), []).append(e)
    return [out[b] for b in sorted(out)]


def split_runs(events: list[dict], gap_ms: int, max_duration_ms: int) -> list[list[dict]]:
    """Time-ordered events -> runs: a new run starts where the next event is gap_ms or more after the
    last, or max_duration_ms or more after the run's first event (the cap counts from the run's own
    start, never from a clock grid). A streaming job can close a run once the watermark (minus
    lateness) passes min(last + gap, first + max_duration): no later event can join it."""
    runs: list[list[dict]] = []
    first = last = None
    for e in events:
        t = e["event_time"]
        if last is None or t - last >= gap_ms or t - first >= max_duration_ms:
            runs.append([])
            first = t
        runs[-1].append(e)
        last = t
    return runs


def run_closes_at(run_first_ms: int, run_last_ms: int, gap_ms: int, max_duration_ms: int) -> int:
    """Event time from which no further event can join a run that starts and (so far) ends there."""
    return min(run_last_ms + gap_ms, run_first_ms + max_duration_ms)


def session_id_for(user_id: str, first_event_time_ms: int) -> str:
    digest = hashlib.sha256(f"{user_id}\x1f{first_event_time_ms}".encode()).hexdigest()[:20]
    return f"s_{digest}"


def assign_sessions(events: list[dict], gap_ms: int) -> list[dict]:
    """Time-ordered events of one user (one run) -> the same events, session_id filled where missing."""
    out = []
    for run in split_by_gap(events, gap_ms):
        sid = session_id_for(run[0]["user_id"], run[0]["event_time"])
        for e in run:
            out.append(e if e.get("session_id") else {**e, "session_id": sid})
    return out
