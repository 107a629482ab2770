import re

import pytest

from tests.conftest import ROOT
from transforms.config import ConfigError, config_from_dict, load_config, parse_duration


def _documented_keys() -> list[str]:
    """The dotted keys in the first column of README's configuration table ("lists every key")."""
    text = (ROOT / "README.md").read_text()
    table = text.split("`config/batch.yaml` lists every key with its default:", 1)[1].split("\n\n", 2)[1]
    keys = []
    for row in table.splitlines()[2:]:
        section = None
        for token in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if "." in token:  # `time.early_firing`, `evaluation.ope.clip`: the section is all but the last name
                section = token.split("/", 1)[0].rsplit(".", 1)[0]
                names = token[len(section) + 1 :]
            elif section:  # ... / `late_firings`: same section as the one before
                names = token
            else:  # `online_store`: a whole section
                keys.append(token)
                continue
            keys += [f"{section}.{n}" for n in names.split("/")]  # `enrichment.items/users/experiments`
    return keys


def _resolve(model, dotted: str):
    for name in dotted.split("."):
        name = {"schema": "schema_"}.get(name, name) if model.__class__.__name__ == "JobConfig" else name
        assert name in type(model).model_fields, f"{dotted}: README documents a key the config does not have"
        model = getattr(model, name)
    return model


def test_shipped_configs_load():
    defaults = config_from_dict({})
    shipped = {
        name: load_config(str(ROOT / "config" / name)) for name in ("batch.yaml", "local.yaml", "streaming.yaml")
    }
    # batch.yaml shows the defaults of every section, and turns features on with windows of its own.
    batch = shipped["batch.yaml"]
    assert batch.model_dump(exclude={"features"}) == defaults.model_dump(exclude={"features"})
    assert defaults.features is None and [(w.size, w.period) for w in batch.features.windows] == [
        (3600, 900),
        (86400, 21600),
    ]
    # local.yaml: the demo key and sample tables, quality in warn mode (the demo data is dirty on purpose).
    local = shipped["local.yaml"]
    assert local.privacy.allow_demo_key and local.quality.mode == "warn" and local.output.num_shards == 1
    assert local.enrichment.items.path == "../sample/items.csv" and local.enrichment.users.path is None
    # streaming.yaml: the keys it sets differ from the defaults as written.
    st = shipped["streaming.yaml"]
    assert (st.time.lateness, st.time.early_firing, st.time.late_firings, st.time.accumulation) == (
        3600,
        30,
        True,
        "accumulating",
    )
    assert (st.time.output_window.type, st.time.output_window.size) == ("fixed", 300)
    assert (st.sessions.gap, st.sessions.split_every, st.labels.window) == (1800, 3600, 1800)
    assert st.online_store is not None and (st.online_store.host, st.online_store.port, st.online_store.ttl) == (
        "localhost",
        6379,
        7 * 86400,
    )
    assert not st.privacy.allow_demo_key
    # Every key README's table documents exists in every shipped config.
    keys = _documented_keys()
    assert len(keys) > 30 and "validation.event_types" in keys and "time.accumulation" in keys
    for cfg in shipped.values():
        for key in keys:
            _resolve(cfg, key)


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"bots": {"max_events_per_minut": 3}}, "bots.max_events_per_minut: unknown key. Allowed here:"),
        ({"dedupe": {"horizon": "soon"}}, "dedupe.horizon"),
        ({"privacy": {"ipv4_prefix": 40}}, "privacy.ipv4_prefix: Input should be less than or equal to 32"),
        ({"schema": {"unknown_fields": "drop"}}, "schema.unknown_fields: Input should be 'reject' or 'ignore'"),
        ({"bots": {"extra_crawler_patterns": ["("]}}, "bots.extra_crawler_patterns"),
        ({"validation": {"event_types": []}}, "validation.event_types"),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_bad_config_names_the_key(data, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert expected in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("1d") == 86400
    assert parse_duration("250ms") == 0.25 and parse_duration(5) == 5
    with pytest.raises(ValueError):
        parse_duration("-1h")


# --- preflight: every bad value stops the job with exit 2 and the key path, before anything runs ------


@pytest.mark.parametrize(
    "yaml_text,expected",
    [
        ("dedupe: {horizon: .nan}\n", "dedupe.horizon: Value error, a duration must be a finite number"),
        ("labels: {window: .inf}\n", "labels.window: Value error, a duration must be a finite number"),
        ("time: {lateness: -.inf}\n", "time.lateness: Value error, a duration must be a finite number"),
        ("validation: {min_event_time: yesterday}\n", "validation.min_event_time: Value error, not an ISO-8601 time"),
        ("sessions: {split_every: 0}\n", "sessions.split_every: Value error, must be a positive duration"),
        ("sessions: {gap: 0s}\n", "sessions.gap: Value error, must be a positive duration"),
        ("time: {output_window: {size: 0}}\n", "time.output_window.size: Value error, must be a positive duration"),
        ("privacy: {allow_demo_key: 'yes'}\n", "privacy.allow_demo_key: must be true or false"),
        ("privacy: {allow_demo_key: 1}\n", "privacy.allow_demo_key: must be true or false"),
        ("bots: {crawler_user_agents: 'false'}\n", "bots.crawler_user_agents: must be true or false"),
        ("time: {late_firings: on_time}\n", "time.late_firings: must be true or false"),
        # YAML 1.1 booleans, NaN/Inf anywhere, a bool for a number
        ("privacy: {allow_demo_key: yes}\n", "privacy.allow_demo_key: must be true or false (a YAML boolean"),
        ("time: {late_firings: off}\n", "time.late_firings: must be true or false"),
        ("bots: {crawler_user_agents: on}\n", "bots.crawler_user_agents: must be true or false"),
        ("labels: {positive: {click: .nan}}\n", "labels.positive.click: must be a finite number (given: nan)"),
        ("labels: {negative: {skip: .inf}}\n", "labels.negative.skip: must be a finite number (given: inf)"),
        ("labels: {default_negative_weight: .inf}\n", "labels.default_negative_weight: must be a finite number"),
        ("output: {num_shards: true}\n", "output.num_shards: must be a number, not a boolean"),
        ("bots: {max_events_per_minute: false}\n", "bots.max_events_per_minute: must be a number, not a boolean"),
        (
            "validation: {min_event_time: '9999-01-01T00:00:00Z'}\n",
            "validation.min_event_time: is after the job's start",
        ),
    ],
)
def test_bad_values_exit_2_with_key_path_before_anything_runs(tmp_path, capsys, yaml_text, expected):
    from pipelines import batch
    from tests.conftest import write_config

    cfg = write_config(tmp_path, yaml_text)
    (tmp_path / "x.jsonl").write_text("{}\n")
    out = tmp_path / "out"
    # In-process: an exception escaping main (a traceback for the user) would fail this test.
    rc = batch.main(["--config", cfg, "--input", str(tmp_path / "x.jsonl"), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err and "Traceback" not in err
    assert not out.exists()  # stopped before the output folder was touched


def test_yaml_booleans_still_accepted():
    cfg = config_from_dict({"privacy": {"allow_demo_key": True}, "time": {"late_firings": False}})
    assert cfg.privacy.allow_demo_key is True and cfg.time.late_firings is False


def test_every_boolean_key_is_strict():
    """Every bool field of every section (including ones other modules declare) rejects non-booleans."""
    import typing

    from pydantic import BaseModel

    from transforms.config import JobConfig

    seen = []

    def walk(model, path):
        for name, field in model.model_fields.items():
            key = field.alias or name
            args = [field.annotation, *typing.get_args(field.annotation)]
            if bool in args:
                seen.append(f"{path}{key}")
                data: dict = {}
                node = data
                for part in path.rstrip(".").split(".") if path else []:
                    node = node.setdefault(part, {})
                node[key] = "yes"
                with pytest.raises(ConfigError, match=f"{path}{key}: must be true or false"):
                    config_from_dict(data)
            for sub in args:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{path}{key}.")

    walk(JobConfig, "")
    assert {"privacy.allow_demo_key", "bots.crawler_user_agents", "time.late_firings"} <= set(seen)


def test_durations_must_be_finite():
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            parse_duration(bad)


def test_nan_and_inf_label_weights_name_both_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("labels: {positive: {click: .nan}, negative: {skip: .inf}}\nquality: {mode: warn}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "labels.positive.click: must be a finite number" in str(err.value)
    assert "labels.negative.skip: must be a finite number" in str(err.value)


def test_min_event_time_is_judged_against_the_given_job_start():
    import datetime as dt

    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    data = {"validation": {"min_event_time": "2026-10-01T00:00:00Z"}}
    assert config_from_dict(data, now=start).validation.min_event_time == "2026-10-01T00:00:00Z"
    with pytest.raises(ConfigError, match="validation.min_event_time: is after the job's start"):
        config_from_dict(data, now=start - dt.timedelta(days=60))


def test_yaml_words_that_were_booleans_stay_strings_where_strings_are_wanted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("validation: {event_types: [impression, click, on, no]}\ntime: {late_firings: FALSE}\n")
    cfg = load_config(str(path))
    assert cfg.validation.event_types == ("impression", "click", "on", "no") and cfg.time.late_firings is False
