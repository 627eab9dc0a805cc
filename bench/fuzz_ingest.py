"""Fuzz the two ways samples come in, against a real daemon and a real PostgreSQL.

HTTP: ``--http`` requests to ``POST /v1/samples`` of a running daemon (``tests.recording_daemon``
with two accounts' tokens): bodies built from valid ones and broken in the ways inputs break
(wrong types, extreme and non-finite numbers, times at the ends of the calendar and of every
offset, loose L-R8 tokens, NBSP / U+3000 / control-character separators, bare ``\\r``, NUL,
lone surrogates, deep nesting, huge and negative steps, unknown fields, other accounts'
trials, invalid UTF-8, truncated JSON, wrong or missing tokens, stalled bodies).

Log path: ``--lines`` trainer-output lines (random bytes, progress bars, broken samples) written
to a local trial's log file and read by the reconciler's real tail and pump into the ingest
writer, as the daemon does.

Checked: the daemon never exits and never answers 5xx; every item answered ``rejected`` has a
code and a reason and is in ``sample_quarantine`` (counted per source); every log line that
looks like a sample is stored or quarantined; every line the daemon logged is JSON.

    .venv/bin/python bench/fuzz_ingest.py --dsn postgresql://postgres@127.0.0.1:5432/postgres \
        --http 10000 --lines 10000

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chaos import drop_database, with_database  # noqa: E402
from gardener.core import canon  # noqa: E402
from gardener.ledger import db, migrate, trials  # noqa: E402

TOKENS = {"acc1": "fuzz-token-acc1-abcdef", "acc2": "fuzz-token-acc2-uvwxyz"}
SEPARATORS = [" ", "\t", "\u00a0", "\u3000", "\x1c", "\x1d", "\x1e", "\x1f", "\x0b", "\x0c",
              "\r", "\x00", "\u2028", "\x85", "  "]
WEIRD_TEXT = ["", "\x00", "\ud800", "\udfff", "é", "Ω" * 300, "\u202e", "\ufeff", "🤖", "\\",
              "'; DROP TABLE bpb_samples; --", "%s%n", "${jndi:x}", "a" * 10_000, "\r\n",
              "null", "NaN", "-0", "1e309"]
WEIRD_NUMBERS: list[Any] = [0, -0.0, 1e-400, 5e-324, 2.000001, 2.12345, 9.99995, 10, 9.9999,
                            -1, 2**31, 2**31 - 1, 2**63, -(2**63), 10**30, 1e308, 0.1 + 0.2,
                            float("nan"), float("inf"), float("-inf"), True, False, None, "2.1234",
                            "2.123", " 2.1234", "2.1234\u00a0", "２.１２３４", [], {}, "0x1p1"]
WEIRD_TS: list[Any] = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                       "0001-01-01T00:00:00", "9999-12-31T23:59:59.999999+00:00",
                       "2026-02-30T00:00:00Z", "2026-12-01T25:00:00", "2026-12-01T00:00:00+24:00",
                       "yesterday", "", 0, -1, 1e20, -1e20, 253402300800, -62135596801,
                       float("nan"), True, [], "2026-12-01T00:00:00+14:00"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fuzzer:
    def __init__(self, rng: random.Random, names: dict[str, list[str]]) -> None:
        self.rng = rng
        self.names = names

    def name(self) -> Any:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.choice(self.names["acc1"])
        if r < 0.8:
            return self.rng.choice(self.names["acc2"])  # another account's trial
        if r < 0.9:
            return self.rng.choice(self.names["acc1"]) + self.rng.choice(WEIRD_TEXT)[:50]
        return self.rng.choice([*WEIRD_TEXT, 7, None, [], {"a": 1}])

    def number(self) -> Any:
        r = self.rng.random()
        if r < 0.5:
            return round(self.rng.uniform(1.8, 4.0), 4)
        if r < 0.6:
            return f"{self.rng.uniform(0, 9.9999):.4f}"
        return self.rng.choice(WEIRD_NUMBERS)

    def step(self) -> Any:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.randrange(0, 20_000)
        return self.rng.choice([-1, -0, 2**31, 2**31 - 1, 2**64, 1.5, "10", "-0", None, True,
                                float("nan"), [], 10**400 if self.rng.random() < 0.1 else 3])

    def sample(self) -> Any:
        item: dict[str, Any] = {"canon_name": self.name(), "step": self.step(),
                                "bpb": self.number()}
        r = self.rng.random()
        if r < 0.25:
            item["ts"] = self.rng.choice(WEIRD_TS)
        elif r < 0.3:
            item["extra"] = self.rng.choice(WEIRD_TEXT)[:20]
        elif r < 0.35:
            del item[self.rng.choice(["canon_name", "step", "bpb"])]
        if self.rng.random() < 0.03:
            return self.rng.choice([None, 1, "x", [], [item], {"samples": []}])
        return item

    def line(self) -> str:
        r = self.rng.random()
        step, bpb = self.rng.randrange(0, 20_000), f"{self.rng.uniform(0, 9.9999):.4f}"
        sep = self.rng.choice(SEPARATORS)
        if r < 0.3:
            return f"step={step}{sep}BPB={bpb}"
        if r < 0.5:
            key = self.rng.choice(["step", "STEP", "Step", "bpb", "BPB", "val_bpb"])
            return (f"step={self.rng.choice(['-0', '007', '-5', '1e3', str(step)])} BPB={bpb} "
                    f"{key}={self.rng.choice([bpb, '9.0000', 'x'])}")
        if r < 0.6:
            return f"progress {self.rng.randrange(100)}%\rstep={step} BPB={bpb}"
        if r < 0.7:
            return f"DONE: bpb={self.rng.choice([bpb, 'nan', '2.1', ''])}"
        if r < 0.8:
            return f"corpus={self.rng.choice(['stdlib', '', 'x y'])} sha256={'ab' * 32}"
        n = self.rng.randrange(0, 120)
        return "".join(chr(self.rng.choice([self.rng.randrange(32, 127),
                                            self.rng.randrange(0, 0x3000)])) for _ in range(n))

    def body(self) -> tuple[bytes, dict[str, str], str]:
        """(raw body, headers, kind)."""
        token = self.rng.choice(["acc1"] * 8 + ["acc2", "none", "wrong"])
        headers = {"Content-Type": "application/json"}
        if token in TOKENS:
            headers["Authorization"] = f"Bearer {TOKENS[token]}"
        elif token == "wrong":
            headers["Authorization"] = self.rng.choice(["Bearer nope", "Basic abc", "Bearer a b",
                                                        "bearer " + TOKENS["acc1"] + "x"])
        r = self.rng.random()
        doc: Any
        if r < 0.45:
            doc = {"samples": [self.sample() for _ in range(self.rng.randrange(0, 12))]}
        elif r < 0.75:
            doc = {"canon_name": self.name(),
                   "lines": [self.line() for _ in range(self.rng.randrange(0, 12))]}
        elif r < 0.85:
            doc = self.rng.choice([[], None, "x", {"samples": "x"}, {"lines": ["a"]},
                                   {"samples": [], "other": 1}, {"canon_name": "x", "lines": [1]},
                                   {"samples": [self.sample()] * 3, "canon_name": "x"}])
        elif r < 0.9:  # deep nesting, written as text (json.dumps would recurse too deep)
            depth = self.rng.randrange(10, 5000)
            inner = json.dumps({"samples": [self.sample()]}, allow_nan=True)
            return ('{"samples": [' * depth + inner + "]}" * depth).encode(), headers, "deep"
        else:
            raw = self.rng.choice([
                b"{", b"\xff\xfe\x00", b'{"samples": [', b"", b"\x00" * 100,
                json.dumps({"samples": [self.sample()]}, allow_nan=True).encode()[:-3],
                b'{"samples": [{"canon_name": "\xc3\x28", "step": 1, "bpb": 2.0}]}',
                b'{"samples": [{"canon_name": "x", "step": 1e999, "bpb": 2.0}]}',
            ])
            return raw, headers, "raw"
        text = json.dumps(doc, allow_nan=True, ensure_ascii=self.rng.random() < 0.5)
        try:
            return text.encode("utf-8", "surrogatepass"), headers, "json"
        except UnicodeEncodeError:
            return text.encode("utf-8", "replace"), headers, "json"


async def setup(server_dsn: str) -> tuple[str, dict[str, list[str]]]:
    name = f"gardener_fuzz_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = with_database(server_dsn, name)
    conn = await db.connect(dsn)
    names: dict[str, list[str]] = {}
    try:
        await migrate.migrate(conn)
        for k, acc in enumerate(("acc1", "acc2")):
            await trials.ensure_race(conn, f"fuzz-{acc}", acc)
            adm = [trials.Admission(canon.CanonName("HYBRID", "FP32", ("WSD",), 100 * k + i,
                                                    800 + 10 * k + i)) for i in range(4)]
            names[acc] = await trials.admit(conn, f"fuzz-{acc}", acc, adm)
        names["log"] = await trials.admit(conn, "fuzz-acc1", "acc1", [trials.Admission(
            canon.CanonName("HYBRID", "FP32", ("WSD",), 999, 899))])
    finally:
        await conn.close()
    return dsn, names


async def fuzz_http(port: int, fuzzer: Fuzzer, n: int, out: dict[str, Any],
                    proc: subprocess.Popen[bytes]) -> None:
    statuses: Counter[int] = Counter()
    rejected: Counter[str] = Counter()
    no_reason = 0
    async with httpx.AsyncClient(timeout=30) as client:
        sem = asyncio.Semaphore(8)

        async def one() -> None:
            nonlocal no_reason
            body, headers, _ = fuzzer.body()
            async with sem:
                try:
                    r = await client.post(f"http://127.0.0.1:{port}/v1/samples", content=body,
                                          headers=headers)
                except httpx.HTTPError as exc:
                    statuses[-1] += 1
                    out.setdefault("transport_errors", []).append(repr(exc)[:200])
                    return
            statuses[r.status_code] += 1
            if r.status_code >= 500:
                out.setdefault("5xx_bodies", []).append(body[:300].decode("utf-8", "replace"))
            if r.status_code == 200:
                for key in ("samples", "lines"):
                    for res in r.json().get(key, []):
                        if res["status"] == "rejected":
                            rejected[key] += 1
                            if not res.get("code") or not res.get("reason"):
                                no_reason += 1

        for start in range(0, n, 200):
            await asyncio.gather(*(one() for _ in range(min(200, n - start))))
            if proc.poll() is not None:
                break
        # Stalled bodies: each must be answered (408) while the daemon goes on.
        async def stall() -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n"
                         + f"Authorization: Bearer {TOKENS['acc1']}\r\n\r\n{{".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.read(64), 60)
            writer.close()
            return head.startswith(b"HTTP/1.1 408")

        stalled = sum(await asyncio.gather(*(stall() for _ in range(3))))
    out["http_requests"] = sum(statuses.values())
    out["http_statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    out["http_rejected_items"] = dict(rejected)
    out["rejections_without_reason"] = no_reason
    out["stalled_bodies_answered_408"] = stalled


async def fuzz_log_path(dsn: str, fuzzer: Fuzzer, names: list[str], n: int,
                        out: dict[str, Any]) -> None:
    """Lines through a local trial's log file, the local backend's tail, the pump and the
    writer, in this process (the daemon's own code path)."""
    import anyio

    from gardener.backends.base import ServiceSpec, Status
    from gardener.backends.local import LocalBackend
    from gardener.ingest import parse as P
    from gardener.ingest.writer import SampleWriter
    from gardener.loop.control import LoopState
    from gardener.loop.reconciler import Reconciler
    from gardener.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="gardener-fuzz-"))
    script = tmp / "emit.py"
    lines = [fuzzer.line() for _ in range(n)]
    data = tmp / "lines.bin"
    data.write_bytes(b"\n".join(ln.encode("utf-8", "surrogatepass") for ln in lines) + b"\n")
    script.write_text(f"import sys; sys.stdout.buffer.write(open({str(data)!r}, 'rb').read())\n")
    backend = LocalBackend("acc1", tmp / "data")
    name = names[0]
    await backend.ensure(ServiceSpec(name, "acc1", command=(sys.executable, str(script))))
    for _ in range(500):
        if {s.canon_name: s.status for s in await backend.observe()}[name] is Status.SUCCEEDED:
            break
        await asyncio.sleep(0.02)
    pool = await db.create_pool(dsn, min_size=1, max_size=4)
    try:
        async with SampleWriter(pool) as writer:
            rec = Reconciler(pool, Settings(account="acc1"), LoopState(stop=anyio.Event()),
                             {"acc1": backend}, writer)
            rec.known[name] = ("acc1", Status.SUCCEEDED)
            handed = 0
            for _ in range(100):
                got = await rec.pump_once()
                handed += got
                if not got:
                    break
        async with pool.acquire() as conn:
            quarantined = await conn.fetchval(
                "SELECT count(*) FROM sample_quarantine WHERE source = 'local-log'")
            no_reason = await conn.fetchval(
                "SELECT count(*) FROM sample_quarantine WHERE source = 'local-log' AND "
                "(reason IS NULL OR reason = '')")
            stored = await conn.fetchval(
                "SELECT count(*) FROM bpb_samples WHERE canon_name = $1", name)
    finally:
        await pool.close()
    # What the tail hands over, computed independently: "\n" ends a line, "\r" splits it.
    pieces: list[str] = []
    for chunk in data.read_bytes().split(b"\n")[:-1]:
        pieces += [p for p in chunk.decode("utf-8", "replace").split("\r") if p] or [""]
    parsed = P.parse_lines(pieces)
    expect_rejected = sum(isinstance(x, P.Rejected) for x in parsed)
    first: dict[int, float] = {}
    conflicts = 0
    for x in parsed:
        if isinstance(x, P.Sample):
            kept = first.setdefault(x.step, x.bpb)
            conflicts += kept != x.bpb
    expect_samples = len(first)
    out["log_lines_written"] = n
    out["log_lines_handed_over"] = handed
    out["log_quarantined"] = quarantined
    out["log_quarantined_expected"] = expect_rejected + conflicts
    out["log_quarantine_rows_without_reason"] = no_reason
    out["log_samples_stored"] = stored
    out["log_distinct_sample_steps"] = expect_samples


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    dsn, names = await setup(args.dsn)
    fuzzer = Fuzzer(rng, names)
    out: dict[str, Any] = {"seed": args.seed}
    work = Path(tempfile.mkdtemp(prefix="gardener-fuzz-daemon-"))
    log = work / "daemon.log"
    port = free_port()
    env = {**os.environ, "PORT": str(port), "GARDENER_HOST": "127.0.0.1",
           "GARDENER_INGEST_TOKEN_ACC1": TOKENS["acc1"],
           "GARDENER_INGEST_TOKEN_ACC2": TOKENS["acc2"], "GARDENER_LOG_LEVEL": "info",
           "GARDENER_DATA_DIR": str(work / "data")}
    with log.open("wb") as fh:
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before any request)
            [sys.executable, "-m", "tests.recording_daemon", dsn, str(work / "calls.jsonl")],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    started = time.monotonic()
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
        await fuzz_http(port, fuzzer, args.http, out, proc)
        out["daemon_alive_after_http"] = proc.poll() is None
        await fuzz_log_path(dsn, fuzzer, names["log"], args.lines, out)
        conn = await asyncpg.connect(dsn)
        try:
            out["http_quarantined"] = await conn.fetchval(
                "SELECT count(*) FROM sample_quarantine WHERE source = 'http'")
            out["quarantine_rows_without_reason"] = await conn.fetchval(
                "SELECT count(*) FROM sample_quarantine WHERE reason IS NULL OR reason = ''")
            out["samples_stored"] = await conn.fetchval("SELECT count(*) FROM bpb_samples")
        finally:
            await conn.close()
    finally:
        out["daemon_exit_code_before_stop"] = proc.poll()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        out["seconds"] = round(time.monotonic() - started, 1)
        await drop_database(args.dsn, dsn)
    text = log.read_text(errors="replace").splitlines()
    bad = []
    for line in text:
        try:
            json.loads(line)
        except ValueError:
            bad.append(line[:200])
    out["daemon_log_lines"] = len(text)
    out["daemon_non_json_lines"] = len(bad)
    out["daemon_non_json_examples"] = bad[:3]
    rejected_items = sum(out["http_rejected_items"].values())
    out["every_http_rejection_quarantined"] = rejected_items == out["http_quarantined"]
    out["every_log_rejection_quarantined"] = (
        out["log_quarantined"] == out["log_quarantined_expected"]
        and out["log_samples_stored"] == out["log_distinct_sample_steps"]
    )
    out["inputs"] = out["http_requests"] + args.lines
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", default=os.environ.get(
        "GARDENER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--http", type=int, default=10_000, help="fuzzed HTTP requests")
    ap.add_argument("--lines", type=int, default=10_000, help="fuzzed trainer-output lines")
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    from gardener import logs

    logs.configure("json", "warning", stream=sys.stderr)  # the in-process log path's events
    print(json.dumps(asyncio.run(main_async(args)), indent=1))


if __name__ == "__main__":
    main()
