import datetime as dt
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "config" / "schemas"
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
TEST_KEY = b"test-hmac-key"

os.environ.setdefault("FEEDBACK_HMAC_KEY", TEST_KEY.decode())


@pytest.fixture(scope="session")
def registry():
    from transforms.schemas import SchemaRegistry

    return SchemaRegistry.from_directory(str(SCHEMA_DIR))


@pytest.fixture(scope="session")
def rules(registry):
    from transforms.config import config_from_dict
    from transforms.parse import ValidationRules

    cfg = config_from_dict({})
    return ValidationRules.from_config(cfg, registry, dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc))


def write_config(tmp_path, extra: str = "", num_shards: int = 1, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(f"schema: {{directory: {SCHEMA_DIR}}}\noutput: {{num_shards: {num_shards}}}\n{extra}")
    return str(path)


def pytest_configure(config):
    # Beam's TestPipeline/TestStream are classes named Test*; pytest should not try to collect them.
    config.addinivalue_line("filterwarnings", "ignore::pytest.PytestCollectionWarning")
    config.addinivalue_line("markers", "slow: ground-truth and engine tests that take tens of seconds")
