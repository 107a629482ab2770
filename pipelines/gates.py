"""The console line that sums up a run's quality gates, shared by the batch and evaluation jobs."""

from __future__ import annotations


def gates_line(quality: dict, heading: str, noun: str = "") -> str:
    """'<heading>: <met>/<all>[ <noun>] met[, breached: a, b (<mode> mode)]' from a report's quality block
    (its `slos`, `breaches` and `mode`)."""
    slos, breached = quality["slos"], quality["breaches"]
    line = f"{heading}: {len(slos) - len(breached)}/{len(slos)}{f' {noun}' if noun else ''} met"
    if breached:
        line += f", breached: {', '.join(breached)} ({quality['mode']} mode)"
    return line
