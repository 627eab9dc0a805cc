"""The reliability harness in its short form (the full run is ``bench/chaos.py`` and
``bench/fuzz_ingest.py`` by hand, figures in docs/reliability.md): a recorded stream replayed
into a real daemon under SIGKILL, SIGTERM, a pause and terminated sessions gives the same
decisions as an uninterrupted run, with no duplicate and no lost sample; fuzzed HTTP bodies
and trainer output never crash the daemon, never get a 5xx, and every rejection is
quarantined with its reason."""

from __future__ import annotations

import argparse
import os

import pytest

from bench import chaos, fuzz_ingest


def _server(pg_server_dsn: str) -> str:
    return os.environ.get("GARDENER_TEST_DATABASE_URL") or pg_server_dsn


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_race_under_chaos_ends_with_the_uninterrupted_runs_decisions(
    pg_server_dsn: str, tmp_path: object
) -> None:
    args = argparse.Namespace(dsn=_server(pg_server_dsn), trials=8, kills=3, terms=2, pauses=2,
                              sessions=1, spread=0.6, seed=3, workdir=str(tmp_path))
    out = await chaos.main_async(args)
    assert out["events"] == {"kill": 3, "term": 2, "pause": 2, "session": 1}, out
    assert out["same_decisions"], (out["missing_in_chaos"], out["extra_in_chaos"])
    assert out["decisions_calm"] >= 20
    assert out["duplicate_keys"] == 0 and out["unsettled_stages"] == 0
    assert out["answered_200"] == out["samples"] and out["lost_samples"] == 0
    assert out["crashes"] == 0 and out["term_exit_codes"] == {"0": 2}
    assert out["non_json_log_lines"] == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_fuzzed_inputs_never_crash_never_5xx_and_are_all_quarantined(
    pg_server_dsn: str,
) -> None:
    args = argparse.Namespace(dsn=_server(pg_server_dsn), http=300, lines=300, seed=9)
    out = await fuzz_ingest.main_async(args)
    assert out["daemon_alive_after_http"] and out["daemon_exit_code_before_stop"] is None
    assert not any(int(code) >= 500 for code in out["http_statuses"]), out["http_statuses"]
    assert "-1" not in out["http_statuses"], out.get("transport_errors")
    assert out["rejections_without_reason"] == 0 and out["quarantine_rows_without_reason"] == 0
    assert out["every_http_rejection_quarantined"], out
    assert out["every_log_rejection_quarantined"], out
    assert out["stalled_bodies_answered_408"] == 3
    assert out["daemon_non_json_lines"] == 0, out["daemon_non_json_examples"]
