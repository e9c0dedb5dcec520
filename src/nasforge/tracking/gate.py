"""The promotion gate's rules: when does a challenger beat the champion?

Latency is compared in one of two ways, and every decision says which:

* **side by side** (:func:`compare_rounds`): champion and challenger timed in the same process on
  the target's runtime, in interleaved rounds (:mod:`nasforge.tracking.side_by_side`). Each round
  gives one median latency per model; the paired per-round ratio challenger / champion and the
  difference (ms) are summarised by their median and a percentile bootstrap confidence interval
  over rounds (``scipy.stats.bootstrap``, 2,000 resamples, fixed seed). "Faster" needs the whole
  ratio interval below ``1 - latency_tolerance``, "slower" the whole interval above
  ``1 + latency_tolerance``.
* **recorded** (:func:`compare_recorded`): the two benchmark p50s at batch 1, measured by
  different processes (possibly on different machines), for targets that cannot be timed here
  (a GPU target on a CPU node, a ``table:`` target). The same thresholds apply to the point values.

Either way a difference below ``latency_floor_ms`` in absolute terms is a **tie**: sub-floor
differences are timer and scheduling noise on sub-millisecond models, and the accuracy decides.
:func:`judge` then applies the accuracy rules: a faster challenger wins unless it loses more than
``accuracy_tolerance``; a slower one never wins; otherwise (tie, or within the tolerance) only
higher accuracy wins, so a rerun that reproduces the same model never moves the alias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

#: One test sample is worth more than this on any split under a million samples, so a smaller
#: accuracy difference is rounding (e.g. of evidence tags written with 6 decimals).
ACC_EPS = 1e-6
#: Bootstrap resamples of the per-round values (percentile intervals; the seed fixes them, so the
#: same measurements always give the same decision).
BOOTSTRAP_RESAMPLES = 2000
_BOOTSTRAP_SEED = 0

FASTER, SLOWER, TIE, WITHIN = "faster", "slower", "tie", "within tolerance"


@dataclasses.dataclass(frozen=True)
class GateSettings:
    """How champion and challenger are compared (``promote:`` in params.yaml).

    Attributes:
        accuracy_tolerance: Accuracy (absolute) a faster challenger may lose.
        latency_tolerance: Relative latency change that counts as faster / slower.
        latency_floor_ms: Absolute latency difference below which the two are tied.
        rounds: Interleaved timing rounds (one paired sample of the ratio each).
        repeats: Timed runs per model per round (the round's value is their median).
        warmup: Untimed runs per model in each round (every round opens fresh sessions).
        confidence: Confidence level of the bootstrap intervals.
        threads: Runtime threads for the timing sessions (``run.threads``).
    """

    accuracy_tolerance: float = 0.005
    latency_tolerance: float = 0.10
    latency_floor_ms: float = 0.05
    rounds: int = 20
    repeats: int = 20
    warmup: int = 10
    confidence: float = 0.95
    threads: int = 2

    @classmethod
    def from_params(cls, params: Any) -> GateSettings:
        """The settings of a :class:`nasforge.config.Params`."""
        p = params.promote
        return cls(
            accuracy_tolerance=p.accuracy_tolerance,
            latency_tolerance=p.latency_tolerance,
            latency_floor_ms=p.latency_floor_ms,
            rounds=p.rounds,
            repeats=p.repeats,
            warmup=p.warmup,
            confidence=p.confidence,
            threads=params.run.threads,
        )


def bootstrap_median_ci(values: Sequence[float], confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (resampling the values)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]):
        return float(np.median(x)), float(np.median(x))
    res = bootstrap(
        (x,),
        np.median,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(_BOOTSTRAP_SEED),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def latency_verdict(
    ratio_ci: tuple[float, float], difference_ms: float, tolerance: float, floor_ms: float
) -> str:
    """``tie`` below the floor, ``faster`` / ``slower`` when the ratio interval clears the
    tolerance on one side, else ``within tolerance``."""
    if abs(difference_ms) < floor_ms:
        return TIE
    if ratio_ci[1] < 1 - tolerance:
        return FASTER
    if ratio_ci[0] > 1 + tolerance:
        return SLOWER
    return WITHIN


def compare_rounds(
    champion: Sequence[float], challenger: Sequence[float], settings: GateSettings
) -> dict[str, Any]:
    """Summarise paired per-round latencies (ms) of the two models.

    Returns:
        ``champion_ms`` / ``challenger_ms`` (median of the rounds) with ``*_ci_ms`` intervals,
        ``ratio`` (median of the per-round ratios challenger / champion) with ``ratio_ci``,
        ``difference_ms`` (median per-round difference) with ``difference_ci_ms``, and the
        ``latency_verdict``.

    Raises:
        ValueError: The two series differ in length or are empty.
    """
    a = np.asarray(champion, dtype=np.float64)
    b = np.asarray(challenger, dtype=np.float64)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need paired rounds, got {len(a)} and {len(b)}")
    conf = settings.confidence
    ratios, diffs = b / a, b - a
    out = {
        "champion_ms": float(np.median(a)),
        "champion_ci_ms": list(bootstrap_median_ci(a, conf)),
        "challenger_ms": float(np.median(b)),
        "challenger_ci_ms": list(bootstrap_median_ci(b, conf)),
        "ratio": float(np.median(ratios)),
        "ratio_ci": list(bootstrap_median_ci(ratios, conf)),
        "difference_ms": float(np.median(diffs)),
        "difference_ci_ms": list(bootstrap_median_ci(diffs, conf)),
    }
    out["latency_verdict"] = latency_verdict(
        tuple(out["ratio_ci"]), out["difference_ms"], settings.latency_tolerance,
        settings.latency_floor_ms,
    )  # fmt: skip
    return out


def compare_recorded(
    champion_ms: float, challenger_ms: float, tolerance: float, floor_ms: float
) -> dict[str, Any]:
    """The same summary from two recorded latencies (no interval: the values are points)."""
    ratio = challenger_ms / champion_ms if champion_ms > 0 else float("inf")
    diff = challenger_ms - champion_ms
    return {
        "champion_ms": float(champion_ms),
        "challenger_ms": float(challenger_ms),
        "ratio": float(ratio),
        "difference_ms": float(diff),
        "latency_verdict": latency_verdict((ratio, ratio), diff, tolerance, floor_ms),
    }


def judge(acc: float, inc_acc: float, verdict: str, acc_tol: float) -> tuple[bool, str]:
    """Apply the accuracy rules to a latency verdict; the verdict and a short why."""
    if verdict == SLOWER:
        return False, "slower beyond the latency tolerance"
    if verdict == FASTER:
        if acc >= inc_acc - acc_tol:
            return True, f"faster at accuracy within {acc_tol} of the champion"
        return False, f"faster, but accuracy is more than {acc_tol} below the champion"
    # Accuracies are fractions of one test split: equal counts must compare equal even after a
    # round trip through registry tags, so "higher" means higher by more than float noise.
    if acc > inc_acc + ACC_EPS:
        return True, f"more accurate at equal latency ({verdict})"
    return False, f"not more accurate at equal latency ({verdict})"


def beats(
    challenger: Any,
    incumbent: dict[str, float],
    acc_tol: float,
    lat_tol: float,
    floor_ms: float = 0.0,
) -> tuple[bool, str]:
    """The recorded-latency gate: does ``challenger`` (anything with ``accuracy`` and
    ``latency_p50_ms``) beat ``incumbent`` (``{"accuracy", "latency_p50_ms"}``)?

    Better means higher accuracy without being more than ``lat_tol`` slower, or accuracy within
    ``acc_tol`` while more than ``lat_tol`` faster; a latency difference under ``floor_ms`` is a
    tie. Used for targets that cannot be timed here and for versions registered concurrently.

    Returns:
        The verdict and a one-sentence reason.
    """
    acc, inc_acc = float(challenger.accuracy), float(incumbent["accuracy"])
    lat, inc_lat = float(challenger.latency_p50_ms), float(incumbent["latency_p50_ms"])
    cmp = compare_recorded(inc_lat, lat, lat_tol, floor_ms)
    won, why = judge(acc, inc_acc, cmp["latency_verdict"], acc_tol)
    facts = (
        f"accuracy {acc:.4f} vs {inc_acc:.4f}, recorded latency {lat:.3f} ms vs {inc_lat:.3f} ms "
        f"(tolerances {lat_tol:.0%} / {acc_tol}, floor {floor_ms} ms)"
    )
    return won, f"{'beats' if won else 'kept champion'}: {why}; {facts}"
