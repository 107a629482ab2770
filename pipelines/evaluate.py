"""Evaluation job: labels + slates (Avro, as the batch job writes them) -> evaluation.json + report.html.

    python -m pipelines.evaluate --config config/batch.yaml --labels 'out/labels/*.avro' \
        --slates 'out/slates/*.avro' --output eval/ [--warn-only] [--overwrite]

Four sections, configured under `evaluation:` (transforms/evaluation.py has the definitions):
  ope             off-policy estimates (IPS, SNIPS, DM, DR) of a target policy from the logged propensities,
                  with request-level bootstrap intervals and weight diagnostics; labels it cannot use are
                  excluded by reason (no_propensity, invalid_propensity, no_target_policy) and counted
  position_bias   examination propensity per position (randomised slates, else an EM position-based
                  model), also written as position_weights.json for `labels.position_weights`
  experiments     per experiment_id x variant readout, delta-method CIs vs control, sample-ratio check
  cold_start      new-item share of exposures and clicks, item-exposure Gini and top-1% share per bucket
Exit codes as pipelines.batch: 2 bad config, an input glob that matches nothing, non-Avro input, inputs
of an unpublished run, or a used --output (nothing ran); 3 the accounting identity (labels read = used by
OPE + excluded) broken, not published; 4 a gate breached (SRM, cold start, concentration, ESS, excluded
share, nothing evaluable, uniform n_actions, position-bias curve), published, unless --warn-only or
quality.mode: warn.
The output folder is a run folder (pipelines/runfolder.py): staged, published with _MANIFEST.json and
_SUCCESS, a used folder refused unless --overwrite.

Beam: every section reduces the records to small aggregates (per request, per unit, per item and
bucket, per item and position) with GroupByKey / CombinePerKey, gathers them with ToList and runs the
pure functions of transforms/evaluation.py on one worker. The per-request rows (OPE bootstrap) are the
largest of these: about 80 bytes a request. Without --runner the job runs on FnApiRunner, named
explicitly (see pipelines/batch.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import sys

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from feedback_report.report_html import render_evaluation_report, write_report_html
from pipelines import runfolder
from pipelines.gates import gates_line
from pipelines.launcher import (
    add_overwrite_flag,
    beam_counters,
    pipeline_options,
    quality_exit_code,
    read_jsonl_glob,
    refuse_unless,
    require_match,
    run_main,
    run_pipeline,
    runner_name,
    write_json,
)
from transforms import evaluation as E
from transforms.config import ConfigError, load_config
from transforms.privacy import redact_path
from transforms.quality import breaches, slo_exit_code

METRICS_NS = "feedback.evaluate"
SECTIONS = ("ope", "position_bias", "experiments", "cold_start")
AVRO_MAGIC = b"Obj\x01"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="YAML job config (its evaluation: section), e.g. config/batch.yaml"
    )
    parser.add_argument("--labels", required=True, help="File glob of label Avro files (batch job output labels/)")
    parser.add_argument("--slates", required=True, help="File glob of slate Avro files (batch job output slates/)")
    parser.add_argument("--output", required=True, help="Output folder (local path or gs://...)")
    parser.add_argument("--warn-only", action="store_true", help="Report gate breaches without failing (exit 0)")
    add_overwrite_flag(parser)
    return parser


def parse_args(argv=None):
    return build_parser().parse_known_args(argv)


def _ms(v) -> int:
    """Avro timestamp-millis may come back as a datetime (fastavro) or as an int."""
    if isinstance(v, dt.datetime):
        return round(v.timestamp() * 1000)
    return int(v)


def is_click(label: dict) -> bool:
    return E.CLICK in (label.get("outcome_types") or ())


# --- off-policy estimates ------------------------------------------------------------------


class _OpeTermsFn(beam.DoFn):
    EXCLUDED = "excluded"

    def __init__(self, tables: E.PolicyTables, reward: str, clip: float | None):
        self._tables, self._reward, self._clip = tables, reward, clip
        self._used = Metrics.counter(METRICS_NS, "ope_exposures")
        self._excluded = {r: Metrics.counter(METRICS_NS, f"ope_excluded_{r}") for r in E.EXCLUSION_REASONS}

    def process(self, label):
        reason = E.exclusion_reason(label, self._tables)
        if reason is not None:
            self._excluded[reason].inc()
            yield beam.pvalue.TaggedOutput(self.EXCLUDED, reason)
            return
        self._used.inc()
        # a label without request_id is a request of its own
        yield (
            label.get("request_id") or f"label:{label['label_id']}",
            E.exposure_terms(label, self._tables, self._reward, self._clip),
        )


def _finish_ope(
    rows: list, excluded: list, labels_read: int, items_seen: int, cfg: E.OpeConfig, has_reward_model: bool
) -> dict:
    ordered = [r for _, r in sorted(rows)]
    out = E.ope_estimates(ordered, cfg.bootstrap_samples, cfg.confidence, cfg.seed, has_reward_model)
    excluded = dict(sorted(excluded))
    out.update(
        section="ope",
        target_policy=cfg.target_policy,
        reward=cfg.reward,
        clip=cfg.clip,
        reward_model=cfg.reward_model,
        labels_read=labels_read,
        excluded=excluded,
        excluded_share=sum(excluded.values()) / labels_read if labels_read else None,
        # accounting identity: every label read is used or excluded for one named reason (exit 3 otherwise)
        accounting={
            "labels_read": labels_read,
            "used": out["exposures"],
            "excluded": sum(excluded.values()),
            "holds": labels_read == out["exposures"] + sum(excluded.values()),
        },
    )
    if cfg.target_policy == "uniform":
        out["items_seen"] = items_seen
    return out


class OffPolicyEstimates(beam.PTransform):
    """Labels -> one dict: IPS / SNIPS (/ DM / DR with a reward model), intervals and diagnostics.

    Args:
      tables: target-policy (and reward-model) tables, loaded on the launcher.
      cfg: the `evaluation.ope` section (reward, clipping, target policy).
    """

    def __init__(self, tables: E.PolicyTables, cfg: E.OpeConfig):
        super().__init__()
        self._tables, self._cfg = tables, cfg

    def expand(self, labels: beam.PCollection[dict]) -> beam.PCollection[dict]:
        terms = labels | "Terms" >> beam.ParDo(
            _OpeTermsFn(self._tables, self._cfg.reward, self._cfg.clip)
        ).with_output_types(tuple[str, dict]).with_outputs(_OpeTermsFn.EXCLUDED, main="terms")
        rows = (
            terms.terms
            | "GroupRequest" >> beam.GroupByKey()
            | "RequestSums" >> beam.MapTuple(lambda rid, ts: (rid, E.request_sums(ts)))
            | "AllRequests" >> beam.combiners.ToList()
        )
        excluded = (
            terms[_OpeTermsFn.EXCLUDED]
            | "CountExcluded" >> beam.combiners.Count.PerElement()
            | "AllExcluded" >> beam.combiners.ToList()
        )
        # counted from the input itself, not from the two outputs, so that the identity can fail
        labels_read = labels | "CountLabels" >> beam.combiners.Count.Globally()
        items_seen = (
            labels
            | "ItemIds" >> beam.Map(lambda l: l["item_id"])
            | "DistinctItems" >> beam.Distinct()
            | "CountItems" >> beam.combiners.Count.Globally()
        )
        return rows | "Estimate" >> beam.Map(
            _finish_ope,
            beam.pvalue.AsSingleton(excluded),
            beam.pvalue.AsSingleton(labels_read),
            beam.pvalue.AsSingleton(items_seen),
            self._cfg,
            self._tables.rewards is not None,
        )


# --- experiments ---------------------------------------------------------------------------


def unit_contribution(label: dict, cfg: E.ExperimentsConfig) -> tuple:
    """A label in an experiment -> ((experiment, variant, unit), (exposures, clicks, conversions, value))."""
    unit = label.get("user_id") if cfg.unit == "user" else label.get("request_id")
    unit = unit or f"label:{label['label_id']}"
    types = set(label.get("outcome_types") or ())
    return (
        (label["experiment_id"], label["variant"], unit),
        (
            1,
            int(E.CLICK in types),
            int(bool(types & set(cfg.conversion_types))),
            float(label["label"]) * float(label["weight"]),
        ),
    )


def _sum_tuples(rows):
    return tuple(sum(col) for col in zip(*rows)) if rows else ()


class _UnitStatsFn(beam.CombineFn):
    """Per (experiment, variant): sums over units for the delta method (fixed-size accumulator)."""

    def create_accumulator(self):
        return E.unit_accumulator(())

    def add_input(self, acc, unit):
        return E.add_unit(acc, dict(zip(E.UNIT_FIELDS, unit)))

    def merge_accumulators(self, accs):
        return E.merge_accumulators(accs)

    def extract_output(self, acc):
        return acc


def _finish_experiments(cells: list, cfg: E.ExperimentsConfig) -> dict:
    by_exp: dict = {}
    for (exp, variant), acc in cells:
        by_exp.setdefault(exp, {})[variant] = acc
    for exp in cfg.experiments:  # a configured experiment with no traffic is reported too (SRM n/a)
        by_exp.setdefault(exp, {})
    return {
        "section": "experiments",
        "experiments": {exp: E.experiment_readout(exp, v, cfg) for exp, v in sorted(by_exp.items())},
    }


class ExperimentReadout(beam.PTransform):
    """Labels -> one dict: per experiment_id x variant readout, delta-method CIs vs control, sample-ratio check.

    Args:
      cfg: the `evaluation.experiments` section.
    """

    def __init__(self, cfg: E.ExperimentsConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, labels: beam.PCollection[dict]) -> beam.PCollection[dict]:
        cfg = self._cfg
        return (
            labels
            | "InExperiment"
            >> beam.Filter(lambda l: l.get("experiment_id") is not None and l.get("variant") is not None)
            | "UnitContribution" >> beam.Map(unit_contribution, cfg)
            | "SumPerUnit" >> beam.CombinePerKey(_sum_tuples)
            | "KeyByVariant" >> beam.MapTuple(lambda k, v: ((k[0], k[1]), v))
            | "UnitStats" >> beam.CombinePerKey(_UnitStatsFn())
            | "AllVariants" >> beam.combiners.ToList()
            | "Readout" >> beam.Map(_finish_experiments, cfg)
        )


# --- cold start and concentration ------------------------------------------------------------


def cold_start_cell(label: dict, first_seen: dict, data_start: int, cfg: E.ColdStartConfig) -> tuple:
    """A label -> ((bucket, item), (exposures, clicks, new_exposures, new_clicks, judged_exposures, judged_clicks))."""
    t = _ms(label["impression_time"])
    age_ms = int(cfg.new_item_age * 1000)
    click = int(is_click(label))
    judged = int(t - age_ms >= data_start)
    new = judged * int(first_seen[label["item_id"]] > t - age_ms)
    return (
        (E.bucket_of(t, int(cfg.bucket * 1000)), label["item_id"]),
        (1, click, new, new * click, judged, judged * click),
    )


class ColdStartAndConcentration(beam.PTransform):
    """Labels -> one dict: new-item exposure share and exposure concentration.

    Args:
      cfg: the `evaluation.cold_start` section.
    """

    def __init__(self, cfg: E.ColdStartConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, labels: beam.PCollection[dict]) -> beam.PCollection[dict]:
        cfg = self._cfg
        times = labels | "ItemTime" >> beam.Map(lambda l: (l["item_id"], _ms(l["impression_time"])))
        first_seen = times | "FirstSeen" >> beam.CombinePerKey(min)
        data_start = (
            times | "Times" >> beam.Values() | "DataStart" >> beam.CombineGlobally(lambda ts: min(ts, default=0))
        )
        return (
            labels
            | "Classify"
            >> beam.Map(cold_start_cell, beam.pvalue.AsDict(first_seen), beam.pvalue.AsSingleton(data_start), cfg)
            | "SumPerBucketItem" >> beam.CombinePerKey(_sum_tuples)
            | "Flatten" >> beam.MapTuple(lambda k, v: (k[0], k[1], *v))
            | "AllCells" >> beam.combiners.ToList()
            | "Trend"
            >> beam.Map(
                lambda cells, start: {"section": "cold_start", **E.cold_start_buckets(cells, start, cfg)},
                beam.pvalue.AsSingleton(data_start),
            )
        )


# --- position bias -------------------------------------------------------------------------


def slate_cells(slate: dict, randomised_policies) -> list:
    """A slate -> ((kind, item, position), (exposures, clicks)); kind 'randomised' or 'logged'."""
    kind = "randomised" if E.is_randomised_slate(slate, randomised_policies) else "logged"
    return [
        ((kind, it["item_id"], it["position"]), (1, int(it["label"])))
        for it in slate.get("items") or ()
        if it.get("position") is not None and it["position"] >= 1
    ]


def _finish_position_bias(cells: list, cfg: E.PositionBiasConfig) -> dict:
    randomised = [(pos, n, c) for (kind, _, pos), (n, c) in cells if kind == "randomised"]
    n_random = sum(n for _, n, _ in randomised)
    method = cfg.method
    if method == "auto":
        method = "randomised" if n_random >= cfg.min_randomised_exposures else "em"
    out = {
        "section": "position_bias",
        "method": method,
        "requested_method": cfg.method,
        "randomised_exposures": n_random,
        "exposures": sum(n for _, (n, _) in cells),
    }
    try:
        if method == "randomised" and not n_random:
            raise ValueError(
                "no randomised slates (a policy in evaluation.position_bias.randomised_policies, or every "
                "propensity 1/n_items); use method auto or em for this traffic"
            )
        if method == "randomised":
            curve = E.position_curve_randomised(randomised, cfg.max_position)
        else:
            curve = E.position_curve_em(
                [(item, pos, n, c) for (_, item, pos), (n, c) in cells],
                cfg.max_position,
                cfg.em_iterations,
                cfg.em_tolerance,
                cfg.em_min_item_exposures,
            )
    except ValueError as e:
        out.update(curve=None, weights=None, error=str(e))
        return out
    # a fit that did not converge is reported (and fails the gate) but not offered to labels as weights
    usable = curve["method"] != "em" or curve["converged"]
    out.update(curve=curve, weights=E.position_weights_table(curve, cfg.max_weight) if usable else None)
    return out


class EstimatePositionBias(beam.PTransform):
    """Slates -> one dict: the click-propensity curve by position and its inverse weights.

    Args:
      cfg: the `evaluation.position_bias` section.
    """

    def __init__(self, cfg: E.PositionBiasConfig):
        super().__init__()
        self._cfg = cfg

    def expand(self, slates: beam.PCollection[dict]) -> beam.PCollection[dict]:
        cfg = self._cfg
        return (
            slates
            | "SlateCells" >> beam.FlatMap(slate_cells, tuple(cfg.randomised_policies))
            | "SumPerCell" >> beam.CombinePerKey(_sum_tuples)
            | "AllCells" >> beam.combiners.ToList()
            | "Curve" >> beam.Map(_finish_position_bias, cfg)
        )


# --- job -----------------------------------------------------------------------------------


def sections_prefix(output: str) -> str:
    return "/".join([output.rstrip("/"), "_evaluation", "sections"])


def build(
    p: beam.Pipeline, cfg: E.EvaluationConfig, tables: E.PolicyTables, labels_glob: str, slates_glob: str, output: str
) -> beam.PCollection:
    """Reads, evaluates, writes one JSON line per section; returns the sections (for tests)."""
    labels = p | "ReadLabels" >> beam.io.ReadFromAvro(labels_glob)
    slates = p | "ReadSlates" >> beam.io.ReadFromAvro(slates_glob)
    parts = (
        labels | "OffPolicy" >> OffPolicyEstimates(tables, cfg.ope),
        slates | "PositionBias" >> EstimatePositionBias(cfg.position_bias),
        labels | "Experiments" >> ExperimentReadout(cfg.experiments),
        labels | "ColdStart" >> ColdStartAndConcentration(cfg.cold_start),
    )
    sections = parts | "Sections" >> beam.Flatten()
    _ = (
        sections
        | "ToJson" >> beam.Map(lambda s: json.dumps(s, sort_keys=True, allow_nan=True))
        | "WriteSections" >> beam.io.WriteToText(sections_prefix(output), file_name_suffix=".jsonl", num_shards=1)
    )
    return sections


def require_avro(flag: str, pattern: str, what: str) -> None:
    """Start-up check: labels and slates are read as Avro (the only format the batch, streaming and replay
    jobs write them in); another file would fail deep inside the pipeline with a fastavro traceback."""
    for m in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(m.path, compression_type="uncompressed") as f:
            head = f.read(len(AVRO_MAGIC))
        if head != AVRO_MAGIC:
            raise ConfigError(
                f"{flag}: {m.path} is not an Avro file; pipelines.evaluate reads the {what} Avro files the "
                f"batch job writes ({what}/*.avro), not JSON lines or other formats"
            )


def run(argv=None) -> dict:
    args, beam_args = parse_args(argv)
    cfg = load_config(args.config)
    ev = cfg.evaluation
    try:
        tables = E.load_policy_tables(ev.ope, cfg.resolve)
    except (OSError, ValueError) as e:
        raise ConfigError(f"evaluation.ope: {e}") from None
    require_match("--labels", args.labels)
    require_match("--slates", args.slates)
    require_avro("--labels", args.labels, "labels")
    require_avro("--slates", args.slates, "slates")
    # as pit_join: no labels or slates of a run that was not published (killed, failed, still running)
    runfolder.check_published(args.labels, "--labels")
    runfolder.check_published(args.slates, "--slates")
    options = pipeline_options(beam_args)
    # Preflight before the pipeline is built: a used, foreign or unwritable --output stops here (exit 2),
    # so no file of an earlier run (a batch report.html, a stale position_weights.json) survives or mixes in.
    folder = runfolder.prepare(args.output, "evaluate", args.overwrite)
    staging = folder.staging
    finished = run_pipeline(options, lambda p: build(p, ev, tables, args.labels, args.slates, staging))
    found = {s.pop("section"): s for s in read_jsonl_glob(sections_prefix(staging) + "*")}
    missing = [s for s in SECTIONS if s not in found]
    if missing:
        raise RuntimeError(f"the job wrote no {missing} section(s)")
    mode = "warn" if args.warn_only else cfg.quality.mode
    out = args.output.rstrip("/")
    evaluation = {
        "job": "evaluate",
        "labels": redact_path(args.labels),
        "slates": redact_path(args.slates),
        "output": redact_path(args.output),
        "config": args.config,
        "runner": runner_name(options),
        "beam_version": beam.__version__,
        "elapsed_seconds": finished.elapsed_seconds,
        **{s: found[s] for s in SECTIONS},
        "metrics": beam_counters(finished.result),
    }
    weights = found["position_bias"].get("weights")
    if weights:
        weights["positions"] = dict(sorted(weights["positions"].items(), key=lambda kv: int(kv[0])))
        write_json(f"{staging}/position_weights.json", weights)
        evaluation["position_weights"] = f"{out}/position_weights.json"
    slos = E.evaluation_slos(evaluation, ev, mode)
    qcfg = cfg.quality.model_copy(update={"mode": mode})
    evaluation["quality"] = {
        "mode": mode,
        "slos": slos,
        "breaches": [b["slo"] for b in breaches(slos)],
        "exit_code": slo_exit_code(slos, qcfg),
        "html": f"{out}/report.html",
    }
    evaluation["run_id"] = folder.run_id
    acc = evaluation["ope"]["accounting"]
    refuse_unless(
        acc["holds"],
        f"accounting identity broken: {acc['labels_read']} labels read but {acc['used']} used by OPE + "
        f"{acc['excluded']} excluded",
        f"{staging}/evaluation.json",
        evaluation,
    )
    write_json(f"{staging}/evaluation.json", evaluation)
    write_report_html(
        f"{staging}/report.html",
        render_evaluation_report(evaluation, slos, title=f"Evaluation of {evaluation['labels']}", mode=mode),
    )
    # published with its verdict, like the batch job: a breached gate (exit 4) is still a complete run
    runfolder.publish(
        folder,
        runfolder.config_digest(cfg.model_dump_json()),
        {
            "labels": evaluation["labels"],
            "slates": evaluation["slates"],
            "accounting": acc,
            "quality": {"exit_code": evaluation["quality"]["exit_code"], "breaches": evaluation["quality"]["breaches"]},
        },
    )
    return evaluation


def _num(v, fmt: str = ".6g") -> str:
    """A figure for the summary; None (e.g. SNIPS when every weight is 0) prints as n/a."""
    return "n/a" if v is None else format(v, fmt)


def format_summary(ev: dict) -> str:
    lines = []
    ope = ev["ope"]
    est = ", ".join(f"{m.upper()} {_num(v['value'])}" for m, v in ope.get("estimates", {}).items())
    lines.append(f"off-policy ({ope.get('target_policy')}, {ope.get('exposures', 0)} exposures): {est or 'n/a'}")
    if ope.get("excluded"):
        lines.append(
            f"  excluded {sum(ope['excluded'].values())} of {ope['labels_read']} labels "
            f"({_num(100 * ope['excluded_share'], '.3g')}%): "
            + ", ".join(f"{k} {v}" for k, v in ope["excluded"].items())
        )
    if ope.get("diagnostics"):
        d = ope["diagnostics"]
        lines.append(f"  ESS {d['ess']:.1f} ({100 * d['ess_share']:.3g}%), max weight {d['max_weight']:.4g}")
    pb = ev["position_bias"]
    if pb.get("curve"):
        props = ", ".join(f"{p:.3f}" for p in pb["curve"]["propensity"][:10] if p is not None)
        em = pb["curve"] if pb["curve"]["method"] == "em" else None
        fit = (
            f" (EM {'converged' if em['converged'] else 'NOT converged'} in {em['iterations']} iterations)"
            if em
            else ""
        )
        lines.append(f"position bias ({pb['method']}): {props}{fit}")
    elif pb.get("error"):
        lines.append(f"position bias ({pb['method']}): none: {pb['error']}")
    for exp_id, exp in ev["experiments"]["experiments"].items():
        srm = exp.get("srm") or {}
        lines.append(
            f"experiment {exp_id}: "
            + ", ".join(f"{v} {r['units']} units / {r['exposures']:.0f} exposures" for v, r in exp["variants"].items())
            + (f"; SRM p = {srm['p_value']:.3g}" if srm.get("p_value") is not None else "")
        )
    cs = ev["cold_start"]
    if cs.get("new_exposure_share") is not None:
        lines.append(f"new-item exposure share {100 * cs['new_exposure_share']:.3g}%")
    lines.append(gates_line(ev["quality"], "gates"))
    lines.append(f"report: {ev['output'].rstrip('/')}/evaluation.json, report.html")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main(run, argv, format_summary, functools.partial(quality_exit_code, check="gate"))


if __name__ == "__main__":
    sys.exit(main())
