"""Latency lookup tables built by profiling, and the predictor that reads them.

:func:`build_latency_table` measures every block of a search space (see
:mod:`nasforge.hardware.spaces`) on a runtime target through the shared harness, with warm-up,
repetitions and medians, threads fixed, and *interleaved rounds* (every model is timed once per
round; the smallest round median wins) so a burst of load from other processes does not corrupt
one block. Blocks whose output shape equals their input are timed as chains of 1 and 3 copies
and the difference is used, cancelling per-call overhead and graph-boundary layout conversions;
other blocks (stem, reductions, head) are timed alone minus a near-empty baseline model.

Summing blocks misses what the runtime does across block boundaries (fusions, memory reuse,
layout conversions) and per inference, so the table is then *calibrated* on random full networks
measured end to end in the same interleaved rounds (:func:`fit_calibration`): per batch size, the
regression with the best leave-one-out error on those networks among a scale and a per-network
overhead on the block sum (``[block sum, 1]``), ``+ #blocks``, block sums per kind of block,
analytic multiply-adds and activations, and the *in-context* regression (every block's latency
inside a network, fitted on the networks with a ridge towards its profiled latency; see
:func:`_fit_in_context`). Relative error is what is minimised, as the acceptance metric is.
:meth:`LatencyTable.calibrate` refits it from networks measured later (the benchmark stage, or a
predictor benchmark on a busy machine).

A table is versioned JSON (``schema``), keyed by CPU model, ISA flags, thread count, runtime and
version, target, precision, space and network configuration; :meth:`LatencyTable.check_machine`
refuses a table from another machine.

INT8 tables (``precision="int8"``, or an ``-int8`` target) time every block model and every
calibration network as a quickly calibrated PTQ copy in the QDQ layout the pipeline deploys
(:func:`nasforge.bench.timing_export.quantize_for_timing`); the rest of the method is the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

from nasforge.atomic import atomic_file
from nasforge.bench.harness import Session, open_session, time_session
from nasforge.bench.sysinfo import physical_cores, system_info
from nasforge.bench.timing_export import (
    PRECISIONS,
    QUANTIZATION,
    Exporter,
    Precision,
    export_for_timing,
)
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.spaces import BlockSpace
from nasforge.hardware.targets import Target, get_target

#: 2: cell zero nodes are computed by every runtime (no folding); INT8 cell tables count convs
#: with a float output as blocks of their own (``fpconv:``). Tables of an older schema are
#: rebuilt, not reused.
SCHEMA = "nasforge.latency_table/2"


def resolve_precision(target: Target, precision: str | None = None) -> str:
    """The precision a target is timed at: ``int8`` if asked or if the target is an INT8 one
    (``onnxruntime-cpu-int8``), else ``fp32``.

    Raises:
        TargetError: Unknown precision.
    """
    if precision is not None and precision not in PRECISIONS:
        raise TargetError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "int8" if "int8" in (precision, target.precision) else "fp32"


def session_target(target: Target) -> Target:
    """The target to open timing sessions on: an INT8 target's FP32 twin (same runtime and
    device), as the harness refuses files without Q/DQ nodes on INT8 targets, and an INT8
    table also times blocks that have nothing to quantize (sums, pools, the baseline)."""
    if target.precision != "int8":
        return target
    from nasforge.hardware.targets import _REGISTRY

    for factory in _REGISTRY.values():
        twin = factory()
        if (twin.runtime, twin.device, twin.precision) == (target.runtime, target.device, "fp32"):
            return twin
    return target


def _gpu_model() -> str:
    """Name of the first NVIDIA GPU (``nvidia-smi``), or ``""``."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return ""
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.strip().splitlines() or [""])[0].strip()


def machine_key(target: Target, threads: int, precision: str | None = None) -> dict[str, Any]:
    """What makes latencies comparable: CPU, ISA, threads, runtime and its version, precision
    (see :func:`resolve_precision`) and, for GPU targets, the GPU model."""
    info = system_info(threads)
    runtime_version = info["versions"].get(target.runtime) or ""
    key = {
        "cpu_model": info["cpu_model"],
        "isa_flags": info["isa_flags"],
        "threads": threads,
        "runtime": target.runtime,
        "runtime_version": runtime_version,
        "target": target.name,
        "precision": resolve_precision(target, precision),
    }
    if target.device != "cpu":
        key["gpu_model"] = _gpu_model()
    return key


def table_key(target: Target, space: BlockSpace, threads: int, precision: str | None = None) -> str:
    """Short stable hash naming a table file for (machine, target, precision, space, config)."""
    machine = machine_key(target, threads, precision)
    blob = json.dumps(
        {"machine": machine, "space": space.name, "config": space.config()}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


FEATURE_SETS: tuple[tuple[str, ...], ...] = (
    ("block_sum", "const"),
    ("block_sum", "n_blocks", "const"),
)
"""Default candidate regressions (a space may add its own, see
:meth:`nasforge.hardware.spaces.BlockSpace.feature_sets`); :func:`fit_calibration` keeps the one
with the best leave-one-out error on the calibration networks, so more features enter only when
they predict unseen networks better."""


def _sum_prefixes(name: str) -> tuple[str, ...]:
    """Block-key prefixes of a ``sum[p1,p2,...]`` feature."""
    return tuple(p for p in name[4:-1].split(",") if p)


def network_feature(
    name: str,
    counts: Mapping[str, int],
    latencies: Mapping[str, float],
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> float:
    """One per-network regression feature from block counts and profiled block latencies.

    Args:
        name: ``"block_sum"`` (sum of block latencies, ms), ``"n_blocks"`` (number of blocks),
            ``"const"`` (1), ``"sum[p1,p2,...]"``: the block sum over blocks whose key starts
            with one of the prefixes (lets the regression weigh kinds of blocks differently,
            e.g. blocks profiled alone vs. in chains, or ops a runtime fuses into neighbours),
            or ``"stat[s]"``: the network total of an analytic block statistic ``s`` of
            :func:`block_stats` (``mmacs_dense``, ``mmacs_depthwise``, ``mact``: millions of
            multiply-adds and of activation elements per sample).
        counts: Block counts of the network.
        latencies: Block latencies (ms) of one batch size.
        stats: Analytic statistics per block (for ``stat[...]``).

    Raises:
        ValueError: Unknown feature name.
    """
    if name == "block_sum":
        return float(sum(n * latencies[k] for k, n in counts.items()))
    if name == "n_blocks":
        return float(sum(counts.values()))
    if name == "const":
        return 1.0
    if name.startswith("sum[") and name.endswith("]"):
        prefixes = _sum_prefixes(name)
        return float(sum(n * latencies[k] for k, n in counts.items() if k.startswith(prefixes)))
    if name.startswith("stat[") and name.endswith("]") and stats:
        stat = name[5:-1]
        return float(sum(n * stats[k].get(stat, 0.0) for k, n in counts.items()))
    raise ValueError(f"unknown calibration feature {name!r} (or no block statistics)")


def block_stats(module: Any, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Analytic cost of a block per sample: the regression's hardware-independent features.

    Returns:
        ``mmacs_dense`` / ``mmacs_depthwise``: millions of multiply-adds in dense (incl. 1x1)
        and depthwise convolutions and linear layers; ``mact``: millions of activation elements
        written by compute layers (convs, linear, pooling, element-wise sums); ``mparams``.
    """
    import torch
    from torch import nn

    totals = {"mmacs_dense": 0.0, "mmacs_depthwise": 0.0, "mact": 0.0}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            kind = "mmacs_depthwise" if mod.groups > 1 else "mmacs_dense"
            totals[kind] += out.numel() * k / 1e6
        elif isinstance(mod, nn.Linear):
            totals["mmacs_dense"] += out.numel() * mod.in_features / 1e6
        if not isinstance(mod, nn.BatchNorm2d | nn.ReLU | nn.ReLU6):  # fused by runtimes
            totals["mact"] += out.numel() / 1e6

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    totals["mparams"] = sum(p.numel() for p in module.parameters()) / 1e6
    return totals


@dataclasses.dataclass
class Calibration:
    """How block sums become end-to-end latency for one batch size.

    ``predicted = sum(coef * feature)`` over ``features`` (see :func:`network_feature`); without
    features (tables of older builds): ``scale * block_sum + overhead_ms``. ``scale`` and
    ``overhead_ms`` always hold the ``block_sum`` and ``const`` coefficients. The in-context
    regression (``features == ["in_context", "const"]``, see :func:`_fit_in_context`) predicts
    ``sum(count * in_context.get(block, scale * table[block])) + overhead_ms``.
    """

    scale: float = 1.0
    overhead_ms: float = 0.0
    n_networks: int = 0
    fit_median_abs_rel_err: float | None = None
    features: list[str] = dataclasses.field(default_factory=list)
    coefs: list[float] = dataclasses.field(default_factory=list)
    loo_median_abs_rel_err: float | None = None
    loo_within_10pct: float | None = None
    n_outliers: int = 0
    in_context: dict[str, float] = dataclasses.field(default_factory=dict)
    prior_weight: float | None = None

    def apply(
        self,
        counts: Mapping[str, int],
        latencies: Mapping[str, float],
        stats: Mapping[str, Mapping[str, float]] | None = None,
    ) -> float:
        """Calibrated latency (ms) of a network from its block counts and block latencies."""
        if not self.features:
            return self.scale * network_feature("block_sum", counts, latencies) + self.overhead_ms
        if self.features == ["in_context", "const"]:
            model = (self.in_context, self.scale, self.overhead_ms)
            return _apply_in_context(model, counts, latencies)
        pairs = zip(self.features, self.coefs, strict=True)
        return float(sum(c * network_feature(f, counts, latencies, stats) for f, c in pairs))


@dataclasses.dataclass
class LatencyTable:
    """Profiled block latencies of one space on one target, plus calibration.

    Attributes:
        target: Target name.
        space: Space name.
        config: Network configuration of the space.
        machine: :func:`machine_key` of the machine that built it.
        blocks: ``{batch_size: {block_key: latency_ms}}`` (baseline subtracted, >= 0).
        baseline_ms: ``{batch_size: per-call overhead in ms}``.
        calibration: ``{batch_size: Calibration}``.
        settings: Warm-up, repeats, rounds, exporter used.
        folds_constants: The runtime folds input-independent computation (block counting).
        system: Full :func:`system_info` at build time.
        build_seconds: Wall time to build.
        created_utc: ISO timestamp.
        precision: ``"fp32"`` or ``"int8"`` (blocks and networks timed as PTQ QDQ models).
    """

    target: str
    space: str
    config: dict[str, Any]
    machine: dict[str, Any]
    blocks: dict[int, dict[str, float]]
    baseline_ms: dict[int, float]
    calibration: dict[int, Calibration]
    settings: dict[str, Any]
    system: dict[str, Any]
    build_seconds: float = 0.0
    created_utc: str = ""
    folds_constants: bool = False
    block_stats: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    schema: str = SCHEMA
    precision: str = "fp32"

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes profiled."""
        return sorted(self.blocks)

    def block_sum_ms(self, counts: Mapping[str, int], batch_size: int) -> float:
        """Sum of block latencies for given block counts (no calibration).

        Raises:
            TargetError: Batch size not profiled or a block missing from the table.
        """
        table = self._batch(batch_size)
        missing = [k for k in counts if k not in table]
        if missing:
            raise TargetError(
                f"latency table for '{self.target}' has no block {missing[0]} "
                f"(built for {self.config}); rebuild it for this network"
            )
        return float(sum(n * table[k] for k, n in counts.items()))

    def predict_counts(self, counts: Mapping[str, int], batch_size: int) -> float:
        """Calibrated latency (ms) of a network given its block counts."""
        cal = self.calibration.get(batch_size, Calibration())
        # Never below one near-empty inference: a network folded to a constant still costs a call.
        floor = self.baseline_ms.get(batch_size, 0.0)
        self.block_sum_ms(counts, batch_size)  # a clear error for blocks not in the table
        return max(floor, cal.apply(counts, self.blocks[batch_size], self.block_stats))

    def calibrate(
        self,
        space: BlockSpace,
        specs: list[Any],
        measured_ms: Iterable[float],
        batch_size: int,
    ) -> Calibration:
        """Refit this table's calibration for one batch size from networks measured end to end.

        Use it when real networks of the space have been timed (through the harness, as
        profiling does) after the table was built, e.g. by the benchmark stage: the fit then
        reflects the machine as it is now. Replaces ``calibration[batch_size]``.

        Args:
            space: The table's block space.
            specs: Architectures that were measured.
            measured_ms: Their measured latencies (ms), same order.
            batch_size: Batch size they were measured at.

        Returns:
            The new :class:`Calibration`.
        """
        counts = [space.block_counts(s, self.folds_constants, self.precision) for s in specs]
        for c in counts:
            self.block_sum_ms(c, batch_size)  # a clear error for blocks not in the table
        cal = fit_calibration(
            counts, self._batch(batch_size), measured_ms, space.feature_sets(), self.block_stats
        )
        self.calibration[batch_size] = cal
        return cal

    def _batch(self, batch_size: int) -> dict[str, float]:
        if batch_size not in self.blocks:
            raise TargetError(
                f"latency table for '{self.target}' has batch sizes {self.batch_sizes}, "
                f"not {batch_size}"
            )
        return self.blocks[batch_size]

    def check_machine(self, threads: int | None = None) -> None:
        """Raise :class:`TargetError` if this table was built on other hardware or software."""
        tgt = get_target(self.target)
        here = machine_key(tgt, int(threads or self.machine["threads"]), self.precision)
        diff = [k for k in here if here[k] != self.machine.get(k)]
        if diff:
            k = diff[0]
            raise TargetError(
                f"latency table was built with {k}={self.machine.get(k)!r}, "
                f"this machine has {here[k]!r}; rebuild it with `nasforge profile`"
            )

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (integer batch keys become strings)."""
        return {
            "schema": self.schema,
            "target": self.target,
            "space": self.space,
            "config": self.config,
            "machine": self.machine,
            "blocks": {str(b): v for b, v in self.blocks.items()},
            "baseline_ms": {str(b): v for b, v in self.baseline_ms.items()},
            "calibration": {str(b): dataclasses.asdict(c) for b, c in self.calibration.items()},
            "settings": self.settings,
            "system": self.system,
            "build_seconds": self.build_seconds,
            "created_utc": self.created_utc,
            "folds_constants": self.folds_constants,
            "block_stats": self.block_stats,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelFileError: Wrong schema or missing fields.
        """
        if d.get("schema") != SCHEMA:
            raise ModelFileError(f"not a latency table of schema {SCHEMA}: {d.get('schema')!r}")
        try:
            return cls(
                target=d["target"],
                space=d["space"],
                config=dict(d["config"]),
                machine=dict(d["machine"]),
                blocks={int(b): dict(v) for b, v in d["blocks"].items()},
                baseline_ms={int(b): float(v) for b, v in d["baseline_ms"].items()},
                calibration={int(b): Calibration(**c) for b, c in d["calibration"].items()},
                settings=dict(d["settings"]),
                system=dict(d["system"]),
                build_seconds=float(d.get("build_seconds", 0.0)),
                created_utc=str(d.get("created_utc", "")),
                folds_constants=bool(d.get("folds_constants", False)),
                block_stats={k: dict(v) for k, v in d.get("block_stats", {}).items()},
                precision=str(d.get("precision", d["machine"].get("precision", "fp32"))),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"latency table is malformed: {e!r}") from e

    def save(self, path: Path | str) -> Path:
        """Write the table as JSON atomically (temp file + rename)."""
        path = Path(path)
        with atomic_file(path, suffix=".json") as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path | str) -> LatencyTable:
        """Read a table written by :meth:`save`.

        Raises:
            ModelFileError: Missing or malformed file.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFileError(f"latency table not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"latency table {path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


# -------------------------------------------------------------------------------- profiling


def time_interleaved(
    sessions: Mapping[str, Session],
    warmup: int,
    repeats: int,
    rounds: int,
    clock: str = "wall",
    budget_ms: float | None = None,
    min_repeats: int = 3,
    quantile: float = 0.5,
    samples: dict[str, list[float]] | None = None,
    round_values: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Robust latency (ms) per session, timing all sessions once per round.

    Each round times every session up to ``repeats`` times and takes the ``quantile`` of those
    runs (default the median); the result is the *smallest* round value. Load from other
    processes only ever adds time, and it comes in bursts, so the quietest round is the best
    estimate of the uncontended latency; on a quiet machine it equals the plain median. On a
    heavily shared machine a low quantile (down to 0: the fastest run) is more robust still: a
    run during which another process took one of the runtime's cores is slow, never fast.

    Args:
        sessions: Sessions by key.
        warmup: Untimed runs per session before the first round.
        repeats: Timed runs per session per round (at most, with ``budget_ms``).
        rounds: Number of rounds.
        clock: ``"wall"`` or ``"cpu"`` (see :func:`nasforge.bench.harness.time_session`).
        budget_ms: If given, a session whose last warm-up run took ``t`` ms gets only
            ``max(min_repeats, budget_ms / t)`` runs per round: slow models (large batches)
            have little relative noise and would otherwise dominate the profiling time.
        min_repeats: Fewest runs per round under a budget.
        quantile: Per-round statistic (0.5: median).
        samples: If given, filled with every timed run (ms) per key.
        round_values: If given, filled with each round's value (ms) per key, in round order
            (split-half repeatability: compare the minimum over even and odd rounds).

    Returns:
        ``{key: min over rounds of the round's quantile}``.
    """
    best: dict[str, float] = {k: float("inf") for k in sessions}
    reps: dict[str, int] = {}
    for k, s in sessions.items():
        if warmup > 1:
            time_session(s, warmup=warmup - 1, repeats=1, clock=clock)
        t = time_session(s, warmup=0, repeats=1, clock=clock)
        if budget_ms is None:
            reps[k] = repeats
        else:
            reps[k] = int(min(repeats, max(min_repeats, budget_ms // max(float(t[0]), 1e-3))))
    for _ in range(rounds):
        for k, s in sessions.items():
            # One untimed run first: the previous session's runtime threads may still be
            # spinning (ONNX Runtime spins idle workers) and would slow this session's first run.
            t = time_session(s, warmup=1, repeats=reps[k], clock=clock)
            value = float(np.quantile(t, quantile))
            best[k] = min(best[k], value)
            if round_values is not None:
                round_values.setdefault(k, []).append(value)
            if samples is not None:
                samples.setdefault(k, []).extend(t.tolist())
    return best


def _features(
    names: Iterable[str],
    counts: Mapping[str, int],
    latencies: Mapping[str, float],
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> list[float]:
    return [network_feature(f, counts, latencies, stats) for f in names]


def _wnnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares minimising *relative* error (rows weighted by ``1/y``)."""
    w = 1.0 / np.maximum(y, 1e-9)
    coefs, _ = nnls(a * w[:, None], y * w)
    return coefs


IN_CONTEXT_PRIOR_WEIGHTS = (1e-4, 1e-3, 1e-2, 1e-1)
"""Candidate weights of the profiled table against the calibration networks in the in-context
regression (chosen by leave-one-out error): with weight ``w`` one block's latency moving 100%
from its scaled profiled value costs as much as a ``sqrt(w)`` relative error on one network.
Measured here (cell space, 48 networks, 1 thread, one global scale as the prior): blocks
profiled alone or in chains of copies are a poor guide to their cost inside a network (OpenVINO
batch 32: 0% of held-out networks within 10% at ``w = 0.03``, 90% at ``w = 1e-4``), so the
prior mostly fills in blocks that no calibration network contains."""


def _loo_score(rel_err: np.ndarray) -> float:
    """Lower is better: the share of networks off by more than 10% (the acceptance metric) plus
    the median error (breaks ties, rewards getting closer inside the band)."""
    if not np.all(np.isfinite(rel_err)):
        return float("inf")
    return float(np.mean(rel_err > 0.10) + np.median(rel_err))


def _fit_in_context(
    counts: list[Mapping[str, int]],
    latencies: Mapping[str, float],
    y: np.ndarray,
    scale: float | Mapping[str, float],
    weight: float = IN_CONTEXT_PRIOR_WEIGHTS[0],
) -> tuple[dict[str, float], float, float]:
    """Per-block latencies *in context*: the table's, corrected by networks measured end to end.

    A block profiled alone (or in a chain of copies) is not the same block inside a network:
    the runtime fuses it with its neighbours, reuses its buffers, reorders layouts at other
    places. With enough calibration networks each block's share of the end-to-end latency can be
    estimated directly, but a space has more blocks than a table build can afford networks. So
    each block's in-context latency is a non-negative least-squares estimate that minimises the
    relative error on the networks *plus* a ridge penalty pulling it towards its profiled latency
    times a scale (per kind of block where the space has kinds, see :func:`_kind_scales`):
    blocks that many networks share move to what the networks say; blocks few networks contain
    stay near their scaled profile.

    Args:
        counts: Block counts of the calibration networks.
        latencies: Profiled block latencies (ms) of the batch size.
        y: Measured latencies (ms) of the networks.
        scale: One scale for every block, or a scale per block key (missing keys: 1).
        weight: Ridge weight (see :data:`IN_CONTEXT_PRIOR_WEIGHTS`).

    Returns:
        ``(ms per block key of the table, scale for blocks added later, per-network ms)``:
        blocks no calibration network contains keep their scaled profile.
    """
    per_key = scale if isinstance(scale, Mapping) else {}
    default = 1.0 if isinstance(scale, Mapping) else float(scale)
    scaled = {k: per_key.get(k, default) * v for k, v in latencies.items()}
    keys = sorted({k for c in counts for k in c})
    prior = np.array([scaled[k] for k in keys])
    # A block profiled at ~0 ms still gets a finite penalty scale: a typical block's share.
    typical = float(np.median(y)) / max(1.0, float(np.mean([sum(c.values()) for c in counts])))
    sigma = np.maximum(prior, 0.1 * typical)
    w = 1.0 / np.maximum(y, 1e-9)
    rows = np.array([[c.get(k, 0) for k in keys] + [1.0] for c in counts], dtype=float)
    lam = np.sqrt(weight)
    reg = np.c_[np.diag(lam / sigma), np.zeros(len(keys))]
    a = np.vstack([rows * w[:, None], reg])
    b = np.r_[y * w, lam * prior / sigma]
    theta, _ = nnls(a, b)
    fitted = scaled | dict(zip(keys, theta[:-1].tolist(), strict=True))
    scales = [per_key.get(k, default) for k in latencies] or [default]
    return fitted, float(np.median(scales)), float(theta[-1])


def _kind_scales(
    feature_sets: Iterable[tuple[str, ...]],
    counts: list[Mapping[str, int]],
    latencies: Mapping[str, float],
    y: np.ndarray,
    default: float,
) -> dict[str, float]:
    """Scale per block key from the space's per-kind regression (its first feature set of
    ``sum[...]`` features), the in-context prior: blocks of one kind (profiled in chains, or
    alone) relate alike to the network. Keys of no kind, or of a kind the fit zeroed, get
    ``default``."""
    kinds = next((fs for fs in feature_sets if any(f.startswith("sum[") for f in fs)), None)
    if kinds is None or len(y) <= len(kinds) + 1:
        return {k: default for k in latencies}
    a = np.array([_features(kinds, c, latencies) for c in counts])
    coefs = dict(zip(kinds, _wnnls(a, y).tolist(), strict=True))
    out: dict[str, float] = {}
    for k in latencies:
        out[k] = default
        for f in kinds:
            if f.startswith("sum[") and k.startswith(_sum_prefixes(f)):
                out[k] = coefs[f] if coefs[f] > 0 else default
                break
    return out


def _apply_in_context(
    model: tuple[dict[str, float], float, float],
    counts: Mapping[str, int],
    latencies: Mapping[str, float],
) -> float:
    ms, scale, const = model
    return float(sum(n * ms.get(k, scale * latencies[k]) for k, n in counts.items()) + const)


def fit_calibration(
    counts: list[Mapping[str, int]],
    latencies: Mapping[str, float],
    measured_ms: Iterable[float],
    feature_sets: Iterable[tuple[str, ...]] = FEATURE_SETS,
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> Calibration:
    """Fit the per-network calibration on networks measured end to end.

    Each candidate feature set is a non-negative least-squares regression of measured latency
    on per-network features (:func:`network_feature`) that minimises relative error (the
    acceptance metric). Non-negative coefficients keep a per-network overhead and a scale on the
    block sum physical. The feature set ``("in_context", "const")`` is the per-block regression
    of :func:`_fit_in_context` (at least 8 networks; its ridge weight is chosen by leave-one-out
    error among :data:`IN_CONTEXT_PRIOR_WEIGHTS`). The candidate with the best leave-one-out
    score wins: the share of networks off by more than 10% plus the median relative error (a
    later, bigger candidate must beat the best so far by 10%). Networks whose relative residual
    under the simple fit is an outlier (beyond 3 median absolute deviations and 5%: a burst of
    load during their measurement) are left out of the feature-set fits, but every network is
    predicted in the leave-one-out judgement, and the in-context fit uses them all.

    Args:
        counts: Block counts of each calibration network.
        latencies: Profiled block latencies (ms) of the batch size.
        measured_ms: Measured end-to-end latency of each network (ms).
        feature_sets: Candidate regressions.
        stats: Analytic block statistics (:func:`block_stats`) for ``stat[...]`` features;
            feature sets using them are skipped without.

    Returns:
        The :class:`Calibration` (``n_networks`` counts every network given).
    """
    x = np.array([network_feature("block_sum", c, latencies) for c in counts])
    y = np.asarray(list(measured_ms), dtype=float)
    n = len(y)
    if n == 0:
        return Calibration()
    # Outliers by the relative residual of the simplest fit (not by measured/summed ratio,
    # which a real per-network overhead makes larger for small networks).
    # Iterated: a refit without the worst points re-admits the good ones it had pushed out.
    a0 = np.c_[x, np.ones_like(x)]
    keep = np.ones(n, dtype=bool)
    for _ in range(5):
        resid = (a0 @ _wnnls(a0[keep], y[keep]) - y) / y
        center = np.median(resid[keep])
        mad = float(np.median(np.abs(resid[keep] - center)))
        new_keep = np.abs(resid - center) <= max(3 * 1.4826 * mad, 0.05)
        if new_keep.sum() < 3 or (new_keep == keep).all():
            break
        keep = new_keep
    idx = np.flatnonzero(keep)
    # Scale of the simple fit: the prior of the in-context regression for every block.
    base_scale = float(_wnnls(a0[idx], y[idx])[0]) or 1.0
    feature_sets = list(feature_sets)
    key_scale = _kind_scales(feature_sets, [counts[i] for i in idx], latencies, y[idx], base_scale)
    best: tuple[float, int, tuple[str, ...], Any, np.ndarray] | None = None
    for order, names in enumerate(feature_sets):
        if not stats and any(f.startswith("stat[") for f in names):
            continue
        yk = y[idx]
        if "in_context" in names:
            # Fitted on every network: the outliers above are those of the block-sum fit, and
            # networks the block sum explains badly are what this regression is for.
            if n < 8:
                continue  # too few networks to correct blocks one by one
            loo, chosen = np.full(n, np.inf), IN_CONTEXT_PRIOR_WEIGHTS[0]
            for weight in IN_CONTEXT_PRIOR_WEIGHTS:
                trial = np.empty(n)
                for j in range(n):
                    rest = [counts[i] for i in range(n) if i != j]
                    fitted = _fit_in_context(rest, latencies, np.delete(y, j), key_scale, weight)
                    trial[j] = abs(_apply_in_context(fitted, counts[j], latencies) - y[j]) / y[j]
                if _loo_score(trial) < _loo_score(loo):
                    loo, chosen = trial, weight
            model: Any = (*_fit_in_context(counts, latencies, y, key_scale, chosen), chosen)
        else:
            # Fitted without the outliers, but judged on every network (an outlier left out of
            # the judgement would flatter the fits that made it one).
            a_all = np.array([_features(names, c, latencies, stats) for c in counts])
            a = a_all[idx]
            if len(idx) <= len(names) + 1:
                if order > 0:
                    continue  # too few networks to judge a bigger regression
                loo = np.abs(a_all @ _wnnls(a, yk) - y) / y
            else:
                loo = np.empty(n)
                for j in range(n):
                    m = idx[idx != j]
                    loo[j] = abs(a_all[j] @ _wnnls(a_all[m], y[m]) - y[j]) / y[j]
            model = _wnnls(a, yk)
        score = _loo_score(loo)
        # A bigger regression must beat the simpler one clearly, not by noise.
        if best is None or score < 0.9 * best[0]:
            best = (score, order, tuple(names), model, loo)
    assert best is not None
    score, _, names, model, loo = best
    if "in_context" in names:
        ctx_ms, ctx_scale, ctx_const, weight = model
        fit = np.array([_apply_in_context(model[:3], counts[i], latencies) for i in range(n)])
        return Calibration(
            scale=ctx_scale,
            overhead_ms=ctx_const,
            n_networks=n,
            fit_median_abs_rel_err=float(np.median(np.abs(fit - y) / y)),
            features=["in_context", "const"],
            coefs=[1.0, ctx_const],
            loo_median_abs_rel_err=float(np.median(loo)),
            loo_within_10pct=float(np.mean(loo <= 0.10)),
            n_outliers=0,
            in_context=ctx_ms,
            prior_weight=weight,
        )
    coefs = model
    fit = np.array(
        [float(np.dot(coefs, _features(names, counts[i], latencies, stats))) for i in range(n)]
    )
    get = dict(zip(names, coefs.tolist(), strict=True))
    return Calibration(
        scale=float(get.get("block_sum", 0.0)),
        overhead_ms=float(get.get("const", 0.0)),
        n_networks=n,
        fit_median_abs_rel_err=float(np.median(np.abs(fit - y) / y)),
        features=list(names),
        coefs=[float(c) for c in coefs],
        loo_median_abs_rel_err=float(np.median(loo)),
        loo_within_10pct=float(np.mean(loo <= 0.10)),
        n_outliers=int(n - len(idx)),
    )


@contextlib.contextmanager
def torch_single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (exports trace a forward pass).

    On a busy machine torch's multi-threaded CPU kernels spin-wait at barriers: one traced
    forward of a small block measured 0.4 s with 2 threads and 4 ms with 1 here, which made
    exporting the blocks of a space the slowest part of building its table.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_latency_table(
    target: Target | str,
    space: BlockSpace,
    batch_sizes: Iterable[int] = (1,),
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    rounds: int = 6,
    calibration_networks: int = 32,
    exporter: Exporter = "torchscript",
    calibration_exporter: Exporter = "dynamo",
    seed: int = 0,
    clock: str = "wall",
    workdir: Path | str | None = None,
    progress: Callable[[str], None] | None = None,
    budget_ms: float | None = 25.0,
    quantile: float = 0.0,
    precision: Precision | None = None,
) -> LatencyTable:
    """Profile every block of ``space`` on ``target`` and calibrate on full networks.

    Args:
        target: Runtime target or its name.
        space: The block space (e.g. ``CellBlockSpace(shape, resolution)``).
        batch_sizes: Batch sizes to profile.
        threads: Runtime threads (default physical cores); part of the table key.
        warmup: Untimed runs per model.
        repeats: Timed runs per model per round.
        rounds: Interleaved rounds (medians over ``rounds * repeats`` runs).
        calibration_networks: Random full networks measured end to end to fit scale and
            per-network overhead (0 disables calibration).
        exporter: Exporter for block micro-models.
        calibration_exporter: Exporter for calibration networks (``dynamo``, as deployed).
        seed: Seed for the calibration networks.
        clock: ``"wall"`` (default) or ``"cpu"`` (validation on a shared machine, 1 thread).
        workdir: Where to put the ONNX files (default: a temporary directory).
        progress: Called with one-line progress messages.
        budget_ms: Per model and round, time at most about this many ms of runs (at least 3;
            see :func:`time_interleaved`); ``None`` always runs ``repeats``.
        quantile: Per-round statistic of the runs (see :func:`time_interleaved`). The default,
            the fastest run, was the most repeatable estimate on this project's shared 2-core
            machine (split-half difference 7% at batch 1, against 22% for the 10% quantile
            and 55% for the median, under a load average of 8-10); use 0.5 on a quiet machine.
        precision: ``"int8"`` times every block model and calibration network as a PTQ QDQ
            copy (:func:`nasforge.bench.timing_export.quantize_for_timing`); default the
            target's own precision (see :func:`resolve_precision`).

    Returns:
        The :class:`LatencyTable` (not saved; call :meth:`LatencyTable.save`).
    """
    tgt = get_target(target) if isinstance(target, str) else target
    if rounds < 1 or repeats < 1 or warmup < 0 or calibration_networks < 0:
        raise TargetError(
            "profiling needs rounds >= 1, repeats >= 1, warmup >= 0 and calibration networks "
            f">= 0, got {rounds}, {repeats}, {warmup}, {calibration_networks}"
        )
    if tgt.kind != "runtime":
        raise TargetError(f"target '{tgt.name}' is a latency table; it cannot be profiled")
    prec = resolve_precision(tgt, precision)
    tgt.check_available()
    threads = int(threads or physical_cores())
    batch_sizes = sorted({int(b) for b in batch_sizes})
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    folds = bool(getattr(tgt, "folds_constants", False))
    chain = 3
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, torch_single_thread():
        tmpdir = Path(tmp)
        blocks = space.blocks()
        # model key -> (file, input shape); chainable blocks get a 1-chain and a `chain`-chain.
        models: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for i, blk in enumerate([*blocks, space.baseline()]):
            for rep in (1, chain) if blk.chainable else (1,):
                path = tmpdir / f"b{i}x{rep}.onnx"
                export_for_timing(blk.module(rep), blk.input_shape, path, exporter, prec)
                models[f"{blk.key}#{rep}"] = (path, blk.input_shape)
        say(f"exported {len(models)} {prec} block models in {time.perf_counter() - t_start:.1f}s")
        stats = {blk.key: block_stats(blk.module(), blk.input_shape) for blk in blocks}
        for key, source in space.derived_blocks(prec).items():
            stats[key] = stats[source]

        rng = random.Random(seed)
        specs = [space.sample(rng) for _ in range(calibration_networks)]
        nets: list[Path] = []
        for i, spec in enumerate(specs):
            p = tmpdir / f"net{i}.onnx"
            nets.append(
                export_for_timing(
                    space.build(spec), space.input_shape(), p, calibration_exporter, prec
                )
            )
        if nets:
            say(f"exported {len(nets)} calibration networks")

        table_blocks: dict[int, dict[str, float]] = {}
        baselines: dict[int, float] = {}
        calibs: dict[int, Calibration] = {}
        for bs in batch_sizes:
            run_on = session_target(tgt)
            sessions = {
                k: open_session(p, run_on, bs, shape, threads) for k, (p, shape) in models.items()
            }
            # Calibration networks are timed in the same interleaved rounds as the blocks, so
            # both see the same machine state (load, frequency) and the fit relates like to like.
            for i, p in enumerate(nets):
                sessions[f"net#{i}"] = open_session(p, run_on, bs, space.input_shape(), threads)
            med = time_interleaved(
                sessions, warmup, repeats, rounds, clock, budget_ms, quantile=quantile
            )
            del sessions
            baselines[bs] = med["baseline#1"]
            lat: dict[str, float] = {}
            for blk in blocks:
                if blk.chainable:
                    v = (med[f"{blk.key}#{chain}"] - med[f"{blk.key}#1"]) / (chain - 1)
                else:
                    v = med[f"{blk.key}#1"] - baselines[bs]
                lat[blk.key] = max(0.0, v)
            for key, source in space.derived_blocks(prec).items():
                lat[key] = lat[source]
            table_blocks[bs] = lat
            say(f"batch {bs}: profiled {len(blocks)} blocks")
            if nets:
                counts = [space.block_counts(s, folds, prec) for s in specs]
                y = [med[f"net#{i}"] for i in range(len(specs))]
                calibs[bs] = cal = fit_calibration(counts, lat, y, space.feature_sets(), stats)
                say(
                    f"batch {bs}: calibrated {dict(zip(cal.features, cal.coefs, strict=True))} "
                    f"(leave-one-out median error {cal.loo_median_abs_rel_err:.3f})"
                )
            else:
                calibs[bs] = Calibration(overhead_ms=baselines[bs])
    return LatencyTable(
        target=tgt.name,
        space=space.name,
        config=space.config(),
        machine=machine_key(tgt, threads, prec),
        precision=prec,
        folds_constants=folds,
        block_stats=stats,
        blocks=table_blocks,
        baseline_ms=baselines,
        calibration=calibs,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "rounds": rounds,
            "exporter": exporter,
            "calibration_exporter": calibration_exporter,
            "calibration_networks": calibration_networks,
            "chain": chain,
            "seed": seed,
            "clock": clock,
            "budget_ms": budget_ms,
            "quantile": quantile,
            "precision": prec,
            **({"quantization": QUANTIZATION} if prec == "int8" else {}),
        },
        system=system_info(threads),
        build_seconds=time.perf_counter() - t_start,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
