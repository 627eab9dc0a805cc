"""Trainer output to the gardener's ``POST /v1/samples``, with the log as the fallback.

A trainer on Railway that knows the gardener's address (``GARDENER_INGEST_URL``) and its
account's token (``GARDENER_INGEST_TOKEN``) sends its output lines there in small batches
(every ``batch`` lines or ``interval`` seconds, and at the end), so samples arrive in seconds
without spending the account's Railway API budget on log reads. Every line is still printed:
a batch that cannot be delivered (the gardener restarting, a network blip) is kept and sent
with the next one, and whatever never arrives is read from the deployment's log at its end
(the ledger's unique key makes the second delivery of a sample a no-op).

Standard library only: the trainer's image needs nothing more than numpy.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

URL_VAR = "GARDENER_INGEST_URL"
TOKEN_VAR = "GARDENER_INGEST_TOKEN"
MAX_KEPT = 20_000  # lines kept for a gardener that is away; the log has them all anyway


class SamplePoster:
    """Batches lines of one trial and posts them; never raises into the training loop."""

    def __init__(
        self,
        url: str,
        token: str,
        canon_name: str,
        *,
        batch: int = 20,
        interval: float = 2.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.token, self.canon_name = url, token, canon_name
        self.batch, self.interval, self.timeout = batch, interval, timeout
        self.clock = clock
        self.pending: list[str] = []
        self.last_sent = clock()
        self.sent = 0
        self.failures = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SamplePoster | None:
        url, token, name = env.get(URL_VAR), env.get(TOKEN_VAR), env.get("TRAIN_CANON_NAME")
        return cls(url, token, name) if url and token and name else None

    def add(self, line: str) -> None:
        self.pending.append(line)
        if len(self.pending) > MAX_KEPT:
            del self.pending[: len(self.pending) - MAX_KEPT]
        if len(self.pending) >= self.batch or self.clock() - self.last_sent >= self.interval:
            self.flush()

    def flush(self) -> bool:
        """Send what is pending; False (and kept) when the gardener did not take it."""
        if not self.pending:
            return True
        lines = list(self.pending)
        body = json.dumps({"canon_name": self.canon_name, "lines": lines}).encode()
        req = urllib.request.Request(
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.token}"},
        )
        self.last_sent = self.clock()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (400, 401, 403, 413):  # resending cannot help: the log has them
                self._warn(f"the gardener refused {len(lines)} lines: HTTP {exc.code}")
                del self.pending[: len(lines)]
            else:
                self._warn(f"could not post {len(lines)} lines: HTTP {exc.code}")
            return False
        except (OSError, ValueError) as exc:  # URLError, a timeout, a reset connection
            self._warn(f"could not post {len(lines)} lines: {exc}")
            return False
        del self.pending[: len(lines)]
        self.sent += len(lines)
        return True

    def close(self, attempts: int = 5, pause: float = 0.5) -> bool:
        """The last lines, with a few retries; what still fails is left to the log."""
        for i in range(attempts):
            if self.flush():
                return True
            time.sleep(pause * (2**i))
        return False

    def _warn(self, text: str) -> None:
        self.failures += 1
        if self.failures <= 3 or self.failures % 100 == 0:
            print(f"warning: {text} (the log keeps them)", file=sys.stderr, flush=True)
