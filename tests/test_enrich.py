import json

import pytest

from transforms.enrich import classify_device, enrich_event, metadata_entry, read_table_rows

UAS = {
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36": "desktop",  # noqa: E501
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15": "desktop",  # noqa: E501
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1": "mobile",  # noqa: E501
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Mobile Safari/537.36": "mobile",  # noqa: E501
    "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.0 Mobile/15E148 Safari/604.1": "tablet",  # noqa: E501
    "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36": "tablet",  # noqa: E501
    "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/538.1 (KHTML, like Gecko) Version/6.0 TV Safari/538.1": "tv",  # noqa: E501
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)": "bot",
    None: "unknown",
}


@pytest.mark.parametrize("ua,cls", UAS.items())
def test_device_class(ua, cls):
    assert classify_device(ua).device_class == cls


def test_device_class_on_real_browser_corpus():
    """fake-useragent ships UAs collected from real traffic, labelled desktop/mobile/tablet."""
    from pathlib import Path

    import fake_useragent

    rows = [
        json.loads(l)
        for l in (Path(fake_useragent.__file__).parent / "data" / "browsers.jsonl").read_text().splitlines()
    ]
    agree = sum(classify_device(r["useragent"]).device_class == r["type"] for r in rows)
    assert agree / len(rows) > 0.95, agree / len(rows)


def test_tables_from_csv_jsonl():
    assert list(read_table_rows("x.csv", b"item_id,category\ni1,shoes\n")) == [{"item_id": "i1", "category": "shoes"}]
    assert list(read_table_rows("x.jsonl", b'{"item_id": 7, "price": 9.5}\n\n')) == [{"item_id": 7, "price": 9.5}]
    assert metadata_entry({"item_id": 7, "price": 9.5}, "item_id") == ("7", {"price": "9.5"})
    assert metadata_entry({"price": 1}, "item_id") is None


def test_missing_lookup_is_a_counted_default():
    e = {"user_agent": None, "item_id": "i2", "user_id": "u", "experiment_id": None}
    out, missed = enrich_event(e, {"item": {"i1": {"category": "shoes"}}, "user": None, "experiment": {}})
    assert out["item_meta"] is None and missed == ["item"]
    out, missed = enrich_event({**e, "item_id": "i1"}, {"item": {"i1": {"category": "shoes"}}})
    assert out["item_meta"] == {"category": "shoes"} and missed == []
