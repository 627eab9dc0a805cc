"""A real headless Chromium driven over the Chrome DevTools protocol (a websocket), for tests.

Debian's ``chromium`` at /usr/bin/chromium, a fresh profile directory, no network beyond
loopback (no QUIC, no background networking, no component updates, no sync). Console errors,
uncaught exceptions and failed loads are collected as they happen.

``python -m tests.e2e.chromium URL OUT.png [--wait JS] [--width W --height H]`` takes one
screenshot (the README's picture is taken this way during a smoke race).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class Page:
    """One page target: send commands, wait for events, evaluate JavaScript."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._event_added = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            else:
                self.events.append(msg)
                self._event_added.set()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        await self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        msg = await asyncio.wait_for(fut, 30)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return dict(msg.get("result", {}))

    async def wait_event(self, method: str, within: float, after: int = 0) -> dict[str, Any]:
        end = time.monotonic() + within
        while True:
            for e in self.events[after:]:
                if e["method"] == method:
                    return e
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} within {within}s")
            self._event_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), left)

    async def evaluate(self, expression: str) -> Any:
        res = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, within: float, every: float = 0.02) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        end = time.monotonic() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() >= end:
                raise TimeoutError(f"{expression!r} stayed falsy for {within}s")
            await asyncio.sleep(every)

    async def navigate(self, url: str, within: float = 30) -> None:
        mark = len(self.events)
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired", within, after=mark)

    async def screenshot(self, path: Path) -> Path:
        res = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(_write, path, base64.b64decode(res["data"]))
        return path

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        await self.ws.close()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _launch(profile: Path, width: int, height: int, out: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
         "about:blank"],
        stdout=out, stderr=out,
    )


def _targets(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
        return list(json.loads(r.read()))


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if marker.exists():
            lines = marker.read_text().splitlines()
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited {proc.returncode}")
        time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


@contextlib.asynccontextmanager
async def chromium(
    width: int = 1400, height: int = 1000, log: Path | None = None
) -> AsyncIterator[Page]:
    """A fresh headless Chromium with one blank page, closed (and its profile removed) after."""
    profile = Path(tempfile.mkdtemp(prefix="gardener-chromium-"))
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    proc = await asyncio.to_thread(_launch, profile, width, height, out)
    page: Page | None = None
    try:
        port = await asyncio.to_thread(_devtools_port, profile, proc, 30)
        targets = await asyncio.to_thread(_targets, port)
        target = next(t for t in targets if t["type"] == "page")
        ws = await connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024)
        page = Page(ws)
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=False)
        yield page
    finally:
        if page is not None:
            await page.close()
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)
        if log is not None and not isinstance(out, int):
            out.close()
        shutil.rmtree(profile, ignore_errors=True)


async def _main(args: argparse.Namespace) -> None:
    async with chromium(args.width, args.height) as page:
        await page.navigate(args.url)
        if args.wait:
            await page.wait_for(args.wait, args.within)
        await asyncio.sleep(args.settle)
        await page.screenshot(Path(args.out))
        errors = page.console_errors()
    print(json.dumps({"screenshot": args.out, "console_errors": errors}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One screenshot of a page in headless Chromium.")
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--wait", default="document.body.dataset.painted === '1'")
    parser.add_argument("--within", type=float, default=30)
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    asyncio.run(_main(parser.parse_args()))
