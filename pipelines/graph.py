"""The one graph every job shares: raw records in, classified outputs out.

Sources and sinks differ per job (files for batch, Pub/Sub for streaming); the transforms between
them do not. `build_event_graph` returns every output as a PCollection so jobs and tests can attach
their own sinks and assertions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools

import apache_beam as beam
from apache_beam.transforms.trigger import AccumulationMode, AfterCount, AfterWatermark

from pipelines import outputs as output_table
from transforms import contract
from transforms.accounting import Count, CountOutcomes, Tallies, in_global_window
from transforms.bots import BotRules, FilterBots, FilterBotsStreaming
from transforms.config import JobConfig
from transforms.dedupe import DedupeEvents, DedupeEventsStreaming
from transforms.enrich import EnrichEvents, ReadMetadataTable
from transforms.features import ComputeFeatures
from transforms.labels import (
    BuildSlates,
    BuildSlatesStreaming,
    JoinLabels,
    JoinLabelsStreaming,
    LabelRules,
    is_exposure,
    label_polarity,
)
from transforms.parse import ParseEvents, RawChunk, ValidationRules
from transforms.privacy import KeySource, PrivacyRules, ProtectPrivacy
from transforms.records import RecordPacker, clean_event_schema, field_order
from transforms.schemas import SchemaRegistry


@dataclasses.dataclass(frozen=True)
class GraphSettings:
    """Everything the graph needs, resolved once on the launcher from the YAML config."""

    validation: ValidationRules
    privacy: PrivacyRules
    key_source: KeySource
    bots: BotRules
    dedupe_horizon_s: float
    lookups: dict  # name -> (path, key column, pseudonym domain or None)
    clean_schema: dict
    num_shards: int
    labels: LabelRules
    session_gap_s: float
    lateness_s: float
    features: object | None = None  # FeaturesConfig, or None: no features

    @property
    def archive_schema(self) -> dict:
        return self.clean_schema

    @property
    def bots_delay_s(self) -> float:
        """How far behind the watermark judged (human and bot) events can be in streaming: a user's run
        closes at most max_run_duration after its first event, plus lateness (transforms.bots)."""
        return FilterBots.output_delay_s(self.bots, self.lateness_s)

    @property
    def max_output_delay_s(self) -> float:
        """How far behind the watermark the graph's outputs can be in streaming: per-user runs are
        judged up to bots_delay_s late, labels at impression + max(window, lateness) + bots_delay_s."""
        label_wait = max(self.labels.window_ms, self.labels.lateness_ms) / 1000.0
        # Per-user runs (bots_delay_s), then label timers wait the same again past deadlines.
        return 2 * self.bots_delay_s + label_wait + 60.0

    @classmethod
    def from_config(cls, cfg: JobConfig, job_start: dt.datetime | None = None) -> GraphSettings:
        registry = SchemaRegistry.from_directory(cfg.resolve(cfg.schema.directory))
        job_start = job_start or dt.datetime.now(dt.timezone.utc)
        key_source = KeySource.from_config(cfg.privacy, cfg.resolve)
        key_source.load()  # fail at start-up, not on a worker, when no key is configured
        lookups = {}
        for name, table in (
            ("item", cfg.enrichment.items),
            ("user", cfg.enrichment.users),
            ("experiment", cfg.enrichment.experiments),
        ):
            if table.path:
                _require_files(cfg.resolve(table.path), f"enrichment.{name}s.path")
                field = f"{name}_id"
                domain = field if field in cfg.privacy.pseudonymise_fields else None
                lookups[name] = (cfg.resolve(table.path), table.key, domain)
        return cls(
            validation=ValidationRules.from_config(cfg, registry, job_start),
            privacy=PrivacyRules.from_config(cfg.privacy),
            key_source=key_source,
            bots=BotRules.from_config(cfg.bots),
            dedupe_horizon_s=cfg.dedupe.horizon,
            lookups=lookups,
            clean_schema=clean_event_schema(registry),
            num_shards=cfg.output.num_shards,
            labels=LabelRules.from_config(cfg.labels, cfg.time.lateness),
            session_gap_s=cfg.sessions.gap,
            lateness_s=cfg.time.lateness,
            features=cfg.features,
        )


def _require_files(pattern: str, key: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    from transforms.config import ConfigError

    if not FileSystems.match([pattern])[0].metadata_list:
        raise ConfigError(
            f"{key}: no file matches {pattern!r}; fix the path (relative to the config file) "
            f"or set it to null to run without this table"
        )


@dataclasses.dataclass
class GraphOutputs:
    valid: beam.PCollection
    bots: beam.PCollection
    duplicates: beam.PCollection
    dead_letter: beam.PCollection
    consent_dropped: beam.PCollection
    too_late: beam.PCollection  # dead-letter records with reason too_late
    labels: beam.PCollection
    slates: beam.PCollection
    orphan_outcomes: beam.PCollection
    late_outcomes: beam.PCollection
    features: beam.PCollection | None = None  # feature rows (None when features are off)
    counts: beam.PCollection | None = None  # (counter name, count)
    tallies: dict | None = None  # bounded: {output: PCollection of (key, value)} (build_event_graph's tallies)


def _input_marker(_record) -> int:
    return 1


def _per_key_steps(settings: GraphSettings, streaming: bool, chunked: bool = False) -> tuple:
    """(dedupe, bots, labels, slates) steps: the unbounded variants in streaming, the bounded ones
    otherwise. Bounded, the bots step also settles the labels in its per-user groups and the labels
    step is None."""
    if streaming:
        return (
            DedupeEventsStreaming(settings.dedupe_horizon_s, settings.lateness_s),
            FilterBotsStreaming(settings.bots, settings.session_gap_s, settings.lateness_s),
            JoinLabelsStreaming(settings.labels, upstream_delay_s=settings.bots_delay_s),
            BuildSlatesStreaming(allowed_lateness_s=settings.max_output_delay_s),
        )
    # Events cross the bounded GroupByKeys packed, in the clean schema's field order, and stay packed
    # from dedupe to the per-user grouping (bots read a packed event's user and user agent, no dict).
    packer = RecordPacker(field_order(settings.clean_schema))
    return (
        DedupeEvents(settings.dedupe_horizon_s, packer, chunked=chunked, emit_packed=True),
        FilterBots(settings.bots, settings.session_gap_s, packer, labels=settings.labels),
        None,
        BuildSlates(),
    )


def _all_inputs(raw_records, upstream_dead_letters, bounded: bool, chunked: bool = False):
    """The input records, for counting: in a bounded graph one int per element, the number of input
    records it stands for (a raw record or a dead letter the source made in a record's place 1, a
    chunk its length: counted per chunk); in streaming one element per record."""
    # Only the number of inputs matters here, so each side is reduced to a marker in an SDK step before
    # the Flatten. Flink's fuser (Beam Java's GreedyPipelineFuser) rejects a Flatten that takes a
    # runner-executed transform's output (the source's Reshuffle) beside SDK-stage outputs: "PCollectionNodes
    # [...] were consumed but never produced".
    upstream_inputs = [d | f"UpstreamInput{i}" >> beam.Map(_input_marker) for i, d in enumerate(upstream_dead_letters)]
    if not upstream_inputs and not bounded:
        return raw_records
    raw_inputs = raw_records | "InputRecords" >> beam.Map(len if chunked else _input_marker)
    if not upstream_inputs:
        return raw_inputs
    return [raw_inputs, *upstream_inputs] | "AllInputs" >> beam.Flatten()


def _features(humans, settings: GraphSettings, streaming: bool):
    """Feature rows of the judged-human events."""
    if not streaming:
        return humans | "Features" >> ComputeFeatures(settings.features, keyed_windows=True)
    # Accumulating panes: each firing is a complete row for its window (later panes replace
    # earlier ones downstream: the online store keeps the newest, offline readers the fullest).
    # Events reach this point behind the watermark by up to bots_delay_s (a user's run closes at
    # most max_run_duration + lateness after its first event): windows allow max_output_delay_s,
    # more than that, or Beam would drop them silently.
    features_cfg = settings.features.model_copy(
        update={"allowed_lateness": max(settings.features.allowed_lateness, settings.max_output_delay_s)}
    )
    return humans | "Features" >> ComputeFeatures(
        features_cfg,
        trigger=AfterWatermark(late=AfterCount(1)),
        accumulation_mode=AccumulationMode.ACCUMULATING,
    )


# The accounting's output in the bounded graph's tallies (`GraphOutputs.tallies`).
COUNTS = "counts"
_BREAKDOWNS = {
    contract.OUTCOME_DEAD_LETTER: lambda r: r["reason"],
    contract.OUTCOME_BOT: lambda r: r["bot_rule"],
    contract.OUTCOME_VALID: lambda r: r["event_type"],
    contract.COUNTER_LABELS: label_polarity,
}
_EXPOSURE_KEYS = (contract.COUNTER_EXPOSURES,)


def _input_keys(n: int) -> itertools.repeat:
    return itertools.repeat(contract.COUNTER_INPUT, n)  # Counter.update counts it in C


def _exposure_keys(e: dict) -> tuple:
    return _EXPOSURE_KEYS if is_exposure(e) else ()


def _count_outcomes(
    outputs: GraphOutputs, inputs, count_windowing, tallies: tuple = (), chunked: bool = False
) -> tuple:
    """((counter name, count) for inputs, exposures and every counted output, the tallies' outputs).

    Bounded (no `count_windowing`, global window), the accounting is a tally plan applied together
    with the job's own `tallies` lines in one `Tallies` step: each collection is read by one per-bundle
    DoFn, however many counters are taken from it. The tallies' outputs ({output: PCollection}, the
    accounting's under COUNTS) are returned for GraphOutputs.tallies; None otherwise.
    """
    accounting = CountOutcomes(windowing=count_windowing, breakdowns=_BREAKDOWNS)
    # The outcome and label counters are the ones the outputs table declares (outputs.counted).
    counted = output_table.counted(outputs, output_table.BATCH_OUTPUTS)
    if count_windowing is not None or not in_global_window(inputs, *counted.values()):
        if tallies or chunked:  # counted per element here: a chunk would count as one input
            what = "chunked input" if chunked else "the job's tallies"
            raise ValueError(f"{what} needs the bounded graph's tallies (global window, no count_windowing)")
        exposures = outputs.valid | "Exposures" >> beam.Filter(is_exposure)
        counted = {contract.COUNTER_INPUT: inputs, contract.COUNTER_EXPOSURES: exposures, **counted}
        return counted | "Accounting" >> accounting, None
    if any(line.output == COUNTS for line in tallies):
        raise ValueError(f"the job's tallies cannot write to the accounting's output {COUNTS!r}")
    # Sources are named as GraphOutputs fields, the inputs (counts of input records, `_all_inputs`) "input".
    counter_sources = {}
    counter_sources.update((c, s) for o in output_table.BATCH_OUTPUTS for s, c in zip(o.sources, o.counters))
    plan = (
        Count("input", COUNTS, _input_keys),
        *accounting.tally_plan(counter_sources, COUNTS),
        Count("valid", COUNTS, _exposure_keys),
        *tallies,
    )
    sources = {line.source: inputs if line.source == "input" else getattr(outputs, line.source) for line in plan}
    results = sources | "Tallies" >> Tallies(plan)
    return results[COUNTS], results


def build_event_graph(
    raw_records,
    settings: GraphSettings,
    upstream_dead_letters=(),
    streaming: bool | None = None,
    count_windowing=None,
    chunked: bool | None = None,
    tallies=(),
) -> GraphOutputs:
    """RawRecord (or RawChunk) PCollection -> every outcome.

    The per-key steps (dedupe, bots, labels, slates) have a bounded variant (GroupByKey) and an
    unbounded one (state, timers, windows) with the same decisions; they are chosen here, once.

    Args:
      raw_records: RawRecord PCollection from the job's source.
      settings: GraphSettings resolved on the launcher.
      upstream_dead_letters: dead letters made by the source (e.g. unreadable files), each standing
        for one input record.
      streaming: use the unbounded variants; default: whether `raw_records` is unbounded.
      count_windowing: a WindowInto for the counters in streaming (a global-window count never fires
        there).
      chunked: `raw_records` holds RawChunks (lists of RawRecords): parse, privacy and enrichment then
        take one chunk per element and pass the valid events on as lists, which dedupe's keying takes
        apart (Beam's per-element cost paid per chunk); dead letters, consent stubs and too-late
        records still come one per record. Bounded graphs only; default: whether the element type of
        `raw_records` is RawChunk (ReadRawRecords).
      tallies: the job's own tally plan lines (transforms.accounting `Count`, `Fold`; sources named as
        GraphOutputs fields), taken in the accounting's per-bundle step; bounded only. Their outputs are
        in `tallies` of the result.
    """
    p = raw_records.pipeline
    if streaming is None:
        streaming = not raw_records.is_bounded
    if chunked is None:
        chunked = raw_records.element_type is RawChunk
    if chunked and streaming:
        raise ValueError("chunked input is for bounded graphs only")
    parsed = raw_records | "Parse" >> ParseEvents(
        settings.validation, settings.key_source, stamp_event_time=streaming, chunked=chunked
    )
    protected = parsed[ParseEvents.VALID] | "Privacy" >> ProtectPrivacy(
        settings.privacy, settings.key_source, chunked=chunked
    )
    tables = {
        name: p | f"Read{name.title()}Metadata" >> ReadMetadataTable(path, key, domain, settings.key_source)
        for name, (path, key, domain) in sorted(settings.lookups.items())
    }
    enriched = protected | "Enrich" >> EnrichEvents(tables, chunked=chunked)
    dedupe_step, bots_step, labels_step, slates_step = _per_key_steps(settings, streaming, chunked)
    deduped = enriched | "Dedupe" >> dedupe_step
    judged = deduped[contract.TAG_EVENTS] | "Bots" >> bots_step
    humans = judged[contract.TAG_HUMANS]
    joined = judged if labels_step is None else humans | "Labels" >> labels_step
    slates = joined[contract.TAG_LABELS] | "Slates" >> slates_step
    dead = [parsed[ParseEvents.DEAD_LETTER], *upstream_dead_letters] | "AllDeadLetters" >> beam.Flatten()
    inputs = _all_inputs(raw_records, upstream_dead_letters, bounded=not streaming, chunked=chunked)
    outputs = GraphOutputs(
        valid=humans,
        bots=judged[FilterBots.BOTS],
        duplicates=deduped[DedupeEvents.DUPLICATES],
        dead_letter=dead,
        consent_dropped=parsed[ParseEvents.CONSENT_DROPPED],
        too_late=parsed[ParseEvents.TOO_LATE],
        labels=joined[contract.TAG_LABELS],
        slates=slates,
        orphan_outcomes=joined[JoinLabels.ORPHANS],
        late_outcomes=joined[JoinLabels.LATE_OUTCOMES],
    )
    if settings.features is not None:
        outputs.features = _features(humans, settings, streaming)
    outputs.counts, outputs.tallies = _count_outcomes(outputs, inputs, count_windowing, tuple(tallies), chunked)
    return outputs
