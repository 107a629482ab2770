import pytest

from transforms.config import ConfigError, config_from_dict, load_config, parse_duration
from tests.conftest import ROOT


def test_shipped_configs_load():
    for name in ("batch.yaml", "local.yaml", "streaming.yaml"):
        load_config(str(ROOT / "config" / name))


@pytest.mark.parametrize("data,expected", [
    ({"bots": {"max_events_per_minut": 3}}, "bots.max_events_per_minut: unknown key. Allowed here:"),
    ({"dedupe": {"horizon": "soon"}}, "dedupe.horizon"),
    ({"privacy": {"ipv4_prefix": 40}}, "privacy.ipv4_prefix: Input should be less than or equal to 32"),
    ({"schema": {"unknown_fields": "drop"}}, "schema.unknown_fields: Input should be 'reject' or 'ignore'"),
    ({"bots": {"extra_crawler_patterns": ["("]}}, "bots.extra_crawler_patterns"),
    ({"validation": {"event_types": []}}, "validation.event_types"),
    ([1, 2], "top level must be a mapping"),
])
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
