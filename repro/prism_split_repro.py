"""Minimal reproduction: Prism 2.77.0 splits bundles of a stateful stage, and a key's state and timers
then go wrong (apache/beam#35771, open).

    PATH=.venv/bin:$PATH python repro/prism_split_repro.py [--prism PATH] [--runs N] [--no-split]

(from the repository root; not under tests/, so pytest never collects it).

The pipeline is the timer pattern of transforms/bots.py and transforms/labels.py cut to its bones: a
TestStream of (key, n) elements; a stateful DoFn adds each to a bag and sets an event-time timer; the
timer emits what is due and re-arms for the rest. Every input must come out exactly once. A short
sleep in `process` stands for a loaded machine (what the 900-event invariance input does on 2 busy
cores): Prism asks the SDK for progress every >=100 ms, and when a bundle shows none it splits it.

What Prism does on a split (sdks/go/pkg/beam/runners/prism/internal/engine/elementmanager.go,
`splitBundle`): the residual elements go back to the pending queue and *their keys are released*,
although the primary part of the bundle -- elements and timers of the same keys -- is still running.
A stateful bundle gets a copy of its keys' state when it starts (`StateForBundle`) and its changes
are committed when it ends, so a residual's bundle for a released key runs on stale state and one of
the two commits is lost. With `--prism_log_level=debug` Prism logs e.g. "split elements ... elem
count=9, res=5": 3 keys x 3 elements, cut inside the second key, whose first two elements are then
the ones lost (n = ...10, ...11 below). In the project's streaming graph the same split lost events
from the per-user bot bags, fired one label timer 3-4 times on the same stale state (labels written
2-4 times) and logged "Unexpected split on a bundle with timers. See
https://github.com/apache/beam/issues/35771".

Measured here (2026-11-30, Beam 2.77.0 SDK and Prism built from go at v2.77.0, 2 busy cores): 3 runs
of 3: in 54, out 42, lost e.g. [1010, 1011, 1120, 1121, ...]; with `--no-split`
(`--experiments=prism_disable_sdf_split`, read in prism/internal/execute.go) 3 runs of 3 exact.
Prints one line per run and exits 1 when any run lost or repeated an element. Not a test: it shows a
runner bug, and tests/test_time_invariance.py runs Prism with the experiment.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

KEYS, STEPS, PER_STEP, WAIT_S, SLEEP_S = 3, 6, 3, 30, 0.25
DISABLE_SPLIT = "--experiments=prism_disable_sdf_split"


class BufferUntilDue(beam.DoFn):
    """(key, n) at time t -> n at t + WAIT_S; the timer re-arms itself for what is not yet due."""

    BUF = BagStateSpec("repro_buf", VarIntCoder())
    DUE = TimerSpec("repro_due", TimeDomain.WATERMARK)

    def process(self, kv, buf=beam.DoFn.StateParam(BUF), due=beam.DoFn.TimerParam(DUE)):
        time.sleep(SLEEP_S)  # a slow element: no progress between Prism's progress requests
        buf.add(kv[1])
        due.set(Timestamp(seconds=min(buf.read()) + WAIT_S))

    @on_timer(DUE)
    def fire(self, when=beam.DoFn.TimestampParam, buf=beam.DoFn.StateParam(BUF), due=beam.DoFn.TimerParam(DUE)):
        now = when.micros // 1_000_000
        held = sorted(buf.read())
        buf.clear()
        rest = [n for n in held if n + WAIT_S > now]
        for n in held:
            if n + WAIT_S <= now:
                yield window.TimestampedValue(n, n)
        for n in rest:
            buf.add(n)
        if rest:
            due.set(Timestamp(seconds=rest[0] + WAIT_S))


def build_stream() -> tuple[TestStream, list[int]]:
    """Per step, PER_STEP elements of each key (n = the element's event time in seconds), then the
    watermark moves 100 s on: several elements of one key share a bundle, and timers fire between."""
    stream, expected = TestStream(), []
    for step in range(STEPS):
        base = 1000 + step * 100
        batch = [
            window.TimestampedValue((f"k{k}", base + 10 * k + j), base + 10 * k + j)
            for k in range(KEYS)
            for j in range(PER_STEP)
        ]
        expected += [tv.timestamp.micros // 1_000_000 for tv in batch]
        stream = stream.add_elements(batch).advance_watermark_to(base + 100)
    return stream.advance_watermark_to_infinity(), expected


def run_once(prism: str, extra: list[str]) -> collections.Counter:
    stream, _ = build_stream()
    sink = tempfile.NamedTemporaryFile("r", suffix=".txt")  # the SDK harness runs in this process (LOOPBACK)
    args = ["--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK", *extra]
    with beam.Pipeline(options=PipelineOptions(args, streaming=True)) as p:
        keyed = p | stream | beam.Map(tuple).with_output_types(tuple[str, int])  # a KV coder: Prism needs the key
        outputs = keyed | beam.ParDo(BufferUntilDue())
        _ = outputs | beam.Map(lambda n, path=sink.name: open(path, "a").write(f"{n}\n"))
    return collections.Counter(int(line) for line in sink)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prism", help="Prism binary (default: .ci/install-prism's)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-split", action="store_true", help=f"pass {DISABLE_SPLIT}")
    args = parser.parse_args(argv)
    prism = args.prism or subprocess.check_output(["bash", ".ci/install-prism"], text=True).split()[-1]
    _, expected = build_stream()
    bad = 0
    for r in range(args.runs):
        got = run_once(prism, [DISABLE_SPLIT] if args.no_split else [])
        lost = sorted(set(expected) - set(got))
        repeated = sorted(n for n, c in got.items() if c > 1)
        bad += bool(lost or repeated)
        print(f"run {r + 1}: in {len(expected)} out {sum(got.values())} lost {lost} repeated {repeated}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
