"""``nasforge serve``: a LitServe HTTP server with dynamic batching and Pareto-variant switching.

Request checks (size, content type, JSON, nesting, numbers, shape) run in an ASGI middleware in
the HTTP process, before a request is queued: a bad request gets its 4xx at once and can never
fail the batch it would have been grouped with in the inference worker. Every non-2xx response
is counted there for ``/metrics``. See ``README.md`` in this folder for the API.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException
from fastapi.responses import JSONResponse

from nasforge.errors import ConfigError, TargetError
from nasforge.serve.early_exit import EarlyExitRunner
from nasforge.serve.metrics import ServeMetrics, StatusCounts
from nasforge.serve.middleware import request_gate
from nasforge.serve.policy import SwitchPolicy, VariantInfo
from nasforge.serve.validation import RequestRules
from nasforge.serve.variants import VariantSpec, variants_from_dir, variants_from_registry

log = logging.getLogger("nasforge.serve")


def _buckets(max_batch_size: int) -> list[int]:
    """Batch sizes sessions are built for: powers of two up to, and including, the maximum."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]


class VariantAPI(ls.LitAPI):
    """LitServe API over one or more Pareto variants of a target.

    Args:
        variants: Model specs ordered fastest first.
        latencies_ms: Batch-1 latency of each variant measured at start-up.
        target: Runtime target name.
        input_shape: Per-sample shape.
        metrics_path: Snapshot file for ``/metrics``.
        slo_ms: p99 objective for the switching policy.
        switching: Enable variant switching; otherwise the most accurate allowed variant.
        memory_budget_bytes: Variants over it are not loaded.
        threads: Runtime threads per session.
        max_batch_size: LitServe batch size (requests) and largest session batch (samples).
        batch_timeout_s: LitServe queue delay to fill a batch.
        window_s: Window of the recent latency statistics.
    """

    def __init__(
        self,
        variants: list[VariantSpec],
        latencies_ms: list[float],
        target: str,
        input_shape: tuple[int, ...],
        metrics_path: str,
        slo_ms: float,
        switching: bool,
        memory_budget_bytes: int | None,
        threads: int | None,
        max_batch_size: int,
        batch_timeout_s: float,
        window_s: float = 2.0,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s)
        self.variants = variants
        self.latencies_ms = latencies_ms
        self.target = target
        self.input_shape = tuple(input_shape)
        self.metrics_path = metrics_path
        self.slo_ms = slo_ms
        self.switching = switching
        self.memory_budget_bytes = memory_budget_bytes
        self.threads = threads
        self.session_batch = max_batch_size
        self.window_s = window_s

    def setup(self, device: str) -> None:
        """Build one session per batch bucket for every variant within the memory budget
        (an early-exit variant: one dynamic-batch session per stage)."""
        from nasforge.bench.harness import open_session

        infos = [
            VariantInfo(v.name, lat, v.accuracy, v.size_bytes)
            for v, lat in zip(self.variants, self.latencies_ms, strict=True)
        ]
        self.policy = SwitchPolicy(infos, self.slo_ms, self.memory_budget_bytes)
        self.buckets = _buckets(self.session_batch)
        self.sessions: dict[int, dict[int, Any]] = {}
        self.runners: dict[int, EarlyExitRunner] = {}
        for i in self.policy.allowed:
            v = self.variants[i]
            if v.kind == "early_exit":
                self.runners[i] = _early_exit_runner(v, self.target, self.threads)
                continue
            self.sessions[i] = {
                b: open_session(v.path, self.target, b, self.input_shape, self.threads)
                for b in self.buckets
            }
        first = next(iter(self.sessions.values()), None)
        self.dtype = first[1].input_dtype if first is not None else np.float32
        self.metrics = ServeMetrics(
            self.metrics_path, self.window_s, [v.name for v in self.variants]
        )
        self.metrics.active = self.variants[self.policy.current].name
        self.metrics.write()

    # ``request`` stays unannotated: LitServe reads the annotation as the FastAPI request type,
    # and without one it passes the parsed JSON body.
    def decode_request(self, request, **kwargs: Any) -> tuple[np.ndarray, float]:  # noqa: ANN001
        """Validated JSON body (a dict) to (samples, arrival time)."""
        try:
            x = np.asarray(request["inputs"], dtype=self.dtype)
        except (KeyError, TypeError, ValueError) as e:  # only without the validator
            raise HTTPException(422, f"bad inputs: {e}") from e
        return x, float(request.get("_arrival", time.time()))

    def batch(self, inputs: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, float]]:
        """Keep the per-request list: requests may carry several samples each."""
        return inputs

    def _run(self, variant: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of ``x`` on a variant, and the exit of each row for an early-exit variant."""
        if variant in self.runners:  # dynamic batch: no padding, later stages see fewer rows
            res = self.runners[variant].run(x)
            return res.logits, res.exits
        outs = []
        for start in range(0, len(x), self.session_batch):
            chunk = x[start : start + self.session_batch]
            n = len(chunk)
            b = next(s for s in self.buckets if s >= n)
            sess = self.sessions[variant][b]
            if sess.dynamic_batch:  # takes any smaller batch: padding would only cost time
                outs.append(np.asarray(sess.run(chunk)))
                continue
            if b > n:  # static shapes (OpenVINO): pad to the bucket, drop the padding
                pad = np.zeros((b - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(np.asarray(self.sessions[variant][b].run(chunk))[:n])
        return np.concatenate(outs), None

    def predict(
        self, x: list[tuple[np.ndarray, float]] | tuple[np.ndarray, float], **kwargs: Any
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Pick the variant, run the whole batch on it, record metrics."""
        # With max_batch_size 1 LitServe runs its unbatched loop: one decoded request in, one
        # response out, no batch()/unbatch().
        single = isinstance(x, tuple)
        if single:
            x = [x]
        now = time.time()
        queue_ms = max(0.0, (now - min(a for _, a in x)) * 1000)
        current = self.policy.current
        if self.switching:
            chosen = self.policy.choose(
                self.metrics.recent_p99_ms(),
                queue_ms,
                self.metrics.recent_rate(),
                sum(len(s) for s, _ in x),
            )
            if chosen != current:
                sw = self.policy.switches[-1]
                a, b = self.variants[current].name, self.variants[chosen].name
                log.warning("variant switch %s -> %s: %s", a, b, sw.reason)
                self.metrics.record_switch(a, b, sw.reason)
            current = chosen
        xs = np.concatenate([s for s, _ in x])
        start = time.time()
        logits, exits = self._run(current, xs)
        done = time.time()
        self.policy.observe(current, len(xs), done - start)
        name = self.variants[current].name
        self.metrics.record_batch(len(x), len(xs), queue_ms, name)
        if exits is not None:
            self.metrics.record_exits(name, exits.tolist())
        self.metrics.record_latencies([(done - a) * 1000 for _, a in x])
        self.metrics.write_soon()
        out, start = [], 0
        for s, _ in x:
            part = logits[start : start + len(s)]
            if not np.isfinite(part).all():
                # Extreme (if finite) inputs can overflow the logits; JSON has no inf/NaN, and
                # only this request is answered with an error, not its batch.
                out.append({"_error": "the model's outputs for these inputs are not finite"})
                start += len(s)
                continue
            resp: dict[str, Any] = {
                "outputs": part.tolist(),
                "classes": np.argmax(part, axis=1).tolist(),
                "variant": name,
            }
            if exits is not None:  # which exit answered each sample (num_exits - 1 = final)
                resp["exits"] = exits[start : start + len(s)].tolist()
                resp["num_exits"] = self.runners[current].num_exits
            start += len(s)
            out.append(resp)
        return out[0] if single else out

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One response per request."""
        return output

    # No return annotation: LitServe hands it to FastAPI as the response model, which would
    # then validate every response against it (and cannot resolve a string annotation).
    def encode_response(self, output: dict[str, Any], **kwargs: Any):  # noqa: ANN201
        """The response JSON (a dict), or a 422 ``JSONResponse`` for a request whose outputs
        are not finite numbers."""
        if "_error" in output:
            return JSONResponse({"error": output["_error"]}, status_code=422)
        return output


def _early_exit_runner(v: VariantSpec, target: str, threads: int | None) -> EarlyExitRunner:
    """The staged runner of an early-exit variant on the target's runtime (CPU, FP32)."""
    from nasforge.hardware.targets import get_target

    t = get_target(target)
    if t.device != "cpu" or t.precision != "fp32":
        raise TargetError(f"early-exit variant {v.name} runs on FP32 CPU targets, not {target}")
    return EarlyExitRunner(v.path, t.runtime, threads)


def _time_early_exit(runner: EarlyExitRunner, repeats: int = 20) -> float:
    """Median batch-1 latency with every stage run: the worst case, used for ordering."""
    x = np.random.default_rng(0).standard_normal((1, *runner.input_shape)).astype(np.float32)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        runner.run_full(x)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _prepare(
    variants: list[VariantSpec], target: str, threads: int | None
) -> tuple[list[VariantSpec], list[float], tuple[int, ...], np.dtype]:
    """Load each variant once here (clean errors before any worker starts), measure its batch-1
    latency for ordering, and check all variants take the same input shape.

    Returns:
        The variants fastest first, their batch-1 latencies, the per-sample input shape and the
        narrowest input dtype (requests must fit every variant's).
    """
    from nasforge.bench.harness import open_session, time_session

    lat, shape, dtypes = [], None, []
    for v in variants:
        if v.kind == "early_exit":
            runner = _early_exit_runner(v, target, threads)
            s = tuple(runner.input_shape)
            ms = _time_early_exit(runner)
            dtypes.append(np.dtype(np.float32))
        else:
            sess = open_session(v.path, target, 1, None, threads)
            s = tuple(sess.input_shape[1:])
            ms = float(np.median(time_session(sess, warmup=3, repeats=20)))
            dtypes.append(np.dtype(sess.input_dtype))
        if shape is not None and s != shape:
            raise ConfigError(f"variant {v.name} takes input {list(s)}, others {list(shape)}")
        shape = s
        lat.append(ms)
    order = sorted(range(len(variants)), key=lambda i: lat[i])
    assert shape is not None
    dtype = min(dtypes, key=lambda d: np.finfo(d).max if d.kind == "f" else np.iinfo(d).max)
    return [variants[i] for i in order], [lat[i] for i in order], shape, dtype


def _sigterm_as_interrupt() -> None:
    """Let SIGTERM stop the server like Ctrl+C (LitServe's graceful shutdown, temp cleanup).

    Forked HTTP processes inherit the handler; there it restores the default and re-sends the
    signal, so only the main process turns SIGTERM into ``KeyboardInterrupt``.
    """
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def serve(
    source: str | Path,
    target: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 5.0,
    slo_ms: float = 50.0,
    switching: bool = True,
    memory_budget_bytes: int | None = None,
    threads: int | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    max_items_per_request: int = 64,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
    only_champion: bool = False,
) -> None:
    """Serve a target's models over HTTP until interrupted.

    Args:
        source: A folder (benchmark or export output, or a parent of several) or the word
            ``"registry"`` to load ``nasforge-<target>`` from MLflow at ``tracking_uri``.
        target: Runtime target name, e.g. ``"onnxruntime-cpu"``, ``"openvino-cpu-int8"``,
            ``"executorch-xnnpack-cpu"``.
        host: Bind address (``127.0.0.1`` keeps it local).
        port: TCP port.
        max_batch_size: Most requests LitServe groups into one batch (also the largest session
            batch in samples; more samples are run in chunks).
        max_queue_delay_ms: How long LitServe waits to fill a batch (0 = take what is queued).
        slo_ms: p99 latency objective the switching policy holds.
        switching: Switch between variants under load; off = always the most accurate one
            within the memory budget.
        memory_budget_bytes: Variants with larger model files are not loaded.
        threads: Runtime threads per session (default: physical cores).
        max_body_bytes: Larger request bodies get 413.
        max_items_per_request: Most samples in one request.
        tracking_uri: MLflow tracking URI when ``source`` is ``"registry"``.
        cache_dir: Where registry models are downloaded (default: a temp folder).
        only_champion: Serve just the champion (registry) instead of every version.

    Raises:
        NasforgeError: Bad configuration, missing models, unreachable registry.
    """
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_queue_delay_ms < 0:
        raise ConfigError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
    if slo_ms <= 0:
        raise ConfigError(f"slo_ms must be > 0, got {slo_ms}")
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if max_items_per_request < 1:
        raise ConfigError(f"max_items_per_request must be >= 1, got {max_items_per_request}")
    # Metrics file and registry downloads live here and go when the server stops.
    with tempfile.TemporaryDirectory(prefix="nasforge-serve-") as tmp:
        work = Path(tmp)
        if str(source) == "registry":
            if not tracking_uri:
                raise ConfigError("serving from the registry needs tracking_uri")
            specs = variants_from_registry(tracking_uri, target, cache_dir or work / "models")
            if only_champion:
                specs = [s for s in specs if s.champion]
                if not specs:
                    raise ConfigError(f"no champion alias set for target {target}")
        else:
            specs = variants_from_dir(source, target)
        specs, lat, shape, dtype = _prepare(specs, target, threads)
        for s, ms in zip(specs, lat, strict=True):
            log.warning("variant %s: %.3f ms at batch 1, accuracy %s", s.name, ms, s.accuracy)
        metrics_path = str(work / "metrics.json")
        api = VariantAPI(
            specs,
            lat,
            target,
            shape,
            metrics_path,
            slo_ms,
            switching,
            memory_budget_bytes,
            threads,
            max_batch_size,
            max_queue_delay_ms / 1000.0,
        )
        rejected = StatusCounts()  # made before LitServe forks its HTTP process
        server = ls.LitServer(
            api,
            accelerator="cpu",
            devices=1,
            workers_per_device=1,
            timeout=30,
            middlewares=[
                (
                    request_gate,
                    {
                        "rules": RequestRules(shape, max_items_per_request, dtype),
                        "max_body_bytes": max_body_bytes,
                        "counts": rejected,
                    },
                )
            ],
        )
        config = {
            "target": target,
            "input_shape": list(shape),
            "max_batch_size": max_batch_size,
            "max_queue_delay_ms": max_queue_delay_ms,
            "slo_ms": slo_ms,
            "switching": switching,
            "variants": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "latency_b1_ms": ms,
                    "accuracy": s.accuracy,
                    "size_bytes": s.size_bytes,
                }
                for s, ms in zip(specs, lat, strict=True)
            ],
        }

        def metrics() -> dict[str, Any]:
            try:
                worker = json.loads(Path(metrics_path).read_text())
            except (OSError, json.JSONDecodeError):
                worker = {}
            return {**worker, "rejected": rejected.snapshot(), "config": config}

        server.app.add_api_route("/metrics", metrics, methods=["GET"])
        _sigterm_as_interrupt()
        server.run(
            host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning"
        )
