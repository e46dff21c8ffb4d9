"""Structured log lines: one per event, key=value or JSON, secrets masked."""

from __future__ import annotations

import io
import json
import logging

import pytest
from pynetdicom import _config as pynetdicom_config

from bridge.ops.logs import configure_logging, redact, split_event


@pytest.fixture
def capture():
    """Configure logging into a buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("pynetdicom").level)
    buffer = io.StringIO()

    def configure(fmt: str, level: str = "INFO") -> io.StringIO:
        configure_logging(level, fmt, stream=buffer)
        return buffer

    yield configure
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])
    logging.getLogger("pynetdicom").setLevel(saved[2])


def test_kv_line_carries_event_and_fields(capture):
    out = capture("kv")

    logging.getLogger("bridge.ingest").info(
        "study sealed study=%s trigger=%s instances=%d", "st-0a1b2c", "quiet-period", 12
    )

    (line,) = out.getvalue().splitlines()
    assert 'level=info logger=bridge.ingest event="study sealed"' in line
    assert line.endswith("study=st-0a1b2c trigger=quiet-period instances=12")
    assert line.startswith("ts=")


def test_kv_value_with_spaces_is_quoted(capture):
    out = capture("kv")

    logging.getLogger("bridge.workers").warning(
        "job retry scheduled job=%d error=%s", 7, 'HTTP 503: "busy" now'
    )

    assert out.getvalue().rstrip().endswith('error="HTTP 503: \\"busy\\" now"')


def test_json_line_is_one_object_with_parsed_fields(capture):
    out = capture("json")

    logging.getLogger("bridge.peer").info(
        "envelope delivered envelope=%s peer=%s", "e-1", "site-b"
    )

    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "envelope delivered"
    assert record["envelope"] == "e-1" and record["peer"] == "site-b"
    assert record["level"] == "info"


def test_exception_stays_on_the_event_line(capture):
    out = capture("json")

    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        logging.getLogger("bridge.workers").exception("job handler failed job=%d", 3)

    (line,) = out.getvalue().splitlines()
    assert "second line" in json.loads(line)["exc"]


def test_filter_masks_bearer_tokens_and_token_values(capture):
    out = capture("kv")

    logging.getLogger("bridge.peer").warning(
        "peer refused header=%s url=%s",
        "Authorization: Bearer s3cr3t-value",
        "https://b.example/api?token=abc123&x=1",
    )

    text = out.getvalue()
    assert "s3cr3t-value" not in text and "abc123" not in text
    assert "Bearer ***" in text and "token=***" in text


def test_filter_masks_instance_uids_but_keeps_standard_uids_and_addresses():
    text = redact(
        "stored 1.2.826.0.1.3680043.8.498.1234567 as 1.2.840.10008.1.2.1 "
        "from 192.168.1.20"
    )

    assert "1.2.826.0.1.3680043.8.498.1234567" not in text
    assert "uid#" in text
    assert "1.2.840.10008.1.2.1" in text and "192.168.1.20" in text


def test_split_event_separates_phrase_from_fields():
    assert split_event("association accepted calling_ae=CT1 peer=10.0.0.1") == (
        "association accepted",
        {"calling_ae": "CT1", "peer": "10.0.0.1"},
    )


def test_configure_turns_off_pynetdicom_identifier_logging(capture):
    capture("kv")

    assert pynetdicom_config.LOG_REQUEST_IDENTIFIERS is False
    assert pynetdicom_config.LOG_RESPONSE_IDENTIFIERS is False
    assert logging.getLogger("pynetdicom").level == logging.WARNING


def test_debug_keeps_pynetdicom_at_info_not_its_password_dump(capture):
    capture("kv", level="DEBUG")

    assert logging.getLogger("pynetdicom").level == logging.INFO


def test_configuring_twice_keeps_one_handler(capture):
    capture("kv")
    out = capture("json")

    logging.getLogger("bridge").info("daemon started")

    assert len(out.getvalue().splitlines()) == 1
