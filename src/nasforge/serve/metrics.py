"""Serving metrics kept by the inference worker and published as a JSON snapshot file.

LitServe runs inference in a separate (spawned) worker process and HTTP in another, so the
worker writes its counters to a small JSON file (temp file + rename: readers never see a half
written file) and the ``/metrics`` route of the HTTP process reads it.

Writing a snapshot costs about 2 ms (percentiles over up to 10,000 latencies, JSON, rename) —
as much as running a small model — so after a batch it is written only if the last write is
``min_interval_s`` old; a background thread writes pending changes after that interval, so
``/metrics`` is at most ``min_interval_s`` (default 0.1 s) behind.

Responses that are not 2xx are counted where every response passes, in the HTTP process
(:class:`StatusCounts`), not in the worker: a request refused by the request checks, or
answered 404/405 by the framework, never reaches a worker, and a worker error becomes its HTTP
status only in the HTTP process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np


class StatusCounts:
    """Non-2xx HTTP responses by status code, shared by every HTTP process of one server.

    LitServe forks its HTTP (uvicorn) processes from the main process, so counters in shared
    memory made before ``LitServer.run`` are the same memory in each of them: the counts stay
    whole whatever ``num_api_servers`` is, and ``/metrics`` reads them from any process.
    """

    _CODES = 600  # HTTP status codes are 100-599

    def __init__(self) -> None:
        self._counts = multiprocessing.Array("q", self._CODES)

    def add(self, status: int) -> None:
        """Count one response with this status (out-of-range codes count as 500)."""
        code = status if 100 <= status < self._CODES else 500
        with self._counts.get_lock():
            self._counts[code] += 1

    def snapshot(self) -> dict[str, int]:
        """``{"<status>": count}`` of every status seen at least once."""
        with self._counts.get_lock():
            values = list(self._counts)
        return {str(code): n for code, n in enumerate(values) if n}


class ServeMetrics:
    """Counters and latency windows of one inference worker.

    Args:
        path: Snapshot file written after every batch.
        window_s: Latency percentiles (and the policy's p99) use requests finished this recently.
        variant_names: Names of the loaded variants, fastest first.
    """

    def __init__(
        self,
        path: Path | str,
        window_s: float,
        variant_names: list[str],
        min_interval_s: float = 0.1,
    ) -> None:
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self._lock = threading.RLock()  # the flusher thread snapshots while batches record
        self._dirty = False
        self._last_write = 0.0
        self._flusher: threading.Thread | None = None
        self.window_s = window_s
        self.variant_names = variant_names
        self.requests = 0
        self.samples = 0
        self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.per_variant: Counter[str] = Counter()
        self.exits: dict[str, Counter[int]] = {}  # early-exit variants: samples per exit
        self.switches: list[dict[str, Any]] = []
        self.active = variant_names[-1] if variant_names else ""
        self._lat: deque[tuple[float, float]] = deque()  # (finish time, latency ms)
        self._queue: deque[tuple[float, float]] = deque()  # (batch time, queue delay ms)
        self._done: deque[tuple[float, float]] = deque()  # (batch time, samples in it)
        self._all_lat: deque[float] = deque(maxlen=10000)

    def _prune(self, now: float) -> None:
        for d in (self._lat, self._queue, self._done):
            while d and d[0][0] < now - self.window_s:
                d.popleft()

    def recent_p99_ms(self) -> float | None:
        """p99 server latency over the window, ``None`` if no request finished in it."""
        with self._lock:
            self._prune(time.time())
            if not self._lat:
                return None
            values = [v for _, v in self._lat]
        return float(np.percentile(values, 99))

    def recent_rate(self) -> float:
        """Samples served per second over the window (the arrival rate unless overloaded)."""
        with self._lock:
            self._prune(time.time())
            return sum(n for _, n in self._done) / self.window_s

    def record_batch(
        self, n_requests: int, n_samples: int, queue_delay_ms: float, variant: str
    ) -> None:
        """Count one model batch."""
        with self._lock:
            self._record_batch(n_requests, n_samples, queue_delay_ms, variant)

    def _record_batch(
        self, n_requests: int, n_samples: int, queue_delay_ms: float, variant: str
    ) -> None:
        now = time.time()
        self.batches += 1
        self.requests += n_requests
        self.samples += n_samples
        self.batch_sizes[n_samples] += 1
        self.per_variant[variant] += n_samples
        self.active = variant
        self._queue.append((now, queue_delay_ms))
        self._done.append((now, n_samples))

    def record_exits(self, variant: str, exits: list[int]) -> None:
        """Count which exit answered each sample of an early-exit variant."""
        with self._lock:
            self.exits.setdefault(variant, Counter()).update(exits)

    def record_latencies(self, latencies_ms: list[float]) -> None:
        """Record server-side latencies (arrival to result) of finished requests."""
        now = time.time()
        with self._lock:
            for v in latencies_ms:
                self._lat.append((now, v))
                self._all_lat.append(v)

    def record_switch(self, from_name: str, to_name: str, reason: str) -> None:
        """Count one variant switch."""
        with self._lock:
            self.switches.append(
                {"time": time.time(), "from": from_name, "to": to_name, "reason": reason}
            )

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready metrics."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        self._prune(time.time())

        def pct(values: list[float]) -> dict[str, float | None]:
            if not values:
                return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}

        return {
            "requests": self.requests,
            "samples": self.samples,
            "batches": self.batches,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "latency_recent": pct([v for _, v in self._lat]),
            "latency_all": pct(list(self._all_lat)),
            "queue_delay_recent": pct([v for _, v in self._queue]),
            "window_s": self.window_s,
            "active_variant": self.active,
            "variants": self.variant_names,
            "samples_per_variant": dict(self.per_variant),
            "samples_per_exit": {
                v: {str(k): n for k, n in sorted(c.items())} for v, c in self.exits.items()
            },
            "switch_count": len(self.switches),
            "switches": self.switches[-50:],
        }

    def write(self) -> None:
        """Write the snapshot atomically."""
        with self._lock:
            doc = self._snapshot()
            self._dirty = False
            self._last_write = time.monotonic()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)

    def write_soon(self) -> None:
        """Write now if the last write is ``min_interval_s`` old, else leave it to the flusher."""
        if time.monotonic() - self._last_write >= self.min_interval_s:
            self.write()
            return
        self._dirty = True
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            time.sleep(self.min_interval_s)
            if self._dirty:
                self.write()
