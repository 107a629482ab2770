import json
import shutil

from pipelines import schema_check as schemas_cli
from tests.conftest import SCHEMA_DIR
from transforms.schemas import SchemaRegistry, check_registry


def test_shipped_schemas_are_backward_compatible():
    assert schemas_cli.main(["check"]) == 0


def _new_version(tmp_path, mutate):
    for f in SCHEMA_DIR.glob("event.v*.avsc"):
        shutil.copy(f, tmp_path / f.name)
    latest = max(int(f.name.split(".")[1][1:]) for f in SCHEMA_DIR.glob("event.v*.avsc"))
    schema = json.loads((SCHEMA_DIR / f"event.v{latest}.avsc").read_text())
    mutate(schema)
    (tmp_path / f"event.v{latest + 1}.avsc").write_text(json.dumps(schema))
    return latest + 1


def test_new_required_field_is_refused(tmp_path, capsys):
    v = _new_version(tmp_path, lambda s: s["fields"].append({"name": "tenant", "type": "string"}))
    problems = check_registry(SchemaRegistry.from_directory(str(tmp_path)))[v]
    assert any("'tenant' is new and has no default" in p for p in problems)
    assert schemas_cli.main(["check", "--dir", str(tmp_path)]) == 1
    assert "NOT backward compatible" in capsys.readouterr().out


def test_incompatible_type_change_is_refused(tmp_path):
    def change(s):
        for f in s["fields"]:
            if f["name"] == "position":
                f["type"] = ["null", "string"]

    v = _new_version(tmp_path, change)
    problems = check_registry(SchemaRegistry.from_directory(str(tmp_path)))[v]
    assert any("resolution failed" in p for p in problems)


def test_new_optional_field_is_accepted(tmp_path):
    v = _new_version(
        tmp_path, lambda s: s["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None})
    )
    assert check_registry(SchemaRegistry.from_directory(str(tmp_path)))[v] == []


def test_avro_writer_schema_is_recognised(registry):
    for v in registry.versions:
        assert registry.match_writer(registry.get(v).schema).version == v
