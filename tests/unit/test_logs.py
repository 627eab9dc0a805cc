from __future__ import annotations

import io
import json

import structlog

from gardener import logs


def test_json_lines_with_name_and_context_and_no_secrets() -> None:
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    log = logs.get_logger("test", canon_name="IGLA-HYBRID-FP32-WSD-E0005-seed200", account="acc1")
    log.info(
        "decision_applied",
        rung=1,
        railway_token="rw-secret-123",
        dsn="postgresql://gardener:hunter2@db.internal:5432/ledger",
        note="connect to postgresql://u:pa55word@host/db",
    )
    text = out.getvalue()
    for secret in ("rw-secret-123", "hunter2", "pa55word"):
        assert secret not in text
    event = json.loads(text.strip().splitlines()[-1])
    assert event["event"] == "decision_applied"
    assert event["canon_name"] == "IGLA-HYBRID-FP32-WSD-E0005-seed200"
    assert event["account"] == "acc1" and event["rung"] == 1
    assert event["railway_token"] == "***"
    assert "u:***@host" in event["note"]
    structlog.reset_defaults()


def test_console_format_is_readable() -> None:
    out = io.StringIO()
    logs.configure("console", "info", stream=out)
    logs.get_logger("test").info("paused", reason="by hand")
    assert "paused" in out.getvalue() and "by hand" in out.getvalue()
    assert not out.getvalue().lstrip().startswith("{")
    structlog.reset_defaults()
