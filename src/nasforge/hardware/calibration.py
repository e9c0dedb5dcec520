"""Calibration of latency tables: from summed block latencies to end-to-end latency.

Summing blocks misses what the runtime does across block boundaries (fusions, memory reuse,
layout conversions) and per inference, so a table is *calibrated* on random full networks
measured end to end (:func:`fit_calibration`): per batch size, the regression with the best
leave-one-out error on those networks among a scale and a per-network overhead on the block sum
(``[block sum, 1]``), ``+ #blocks``, block sums per kind of block, analytic multiply-adds and
activations (:func:`block_stats`), and the *in-context* regression (every block's latency
inside a network, fitted on the networks with a ridge towards its profiled latency; see
:func:`_fit_in_context`). Relative error is what is minimised, as the acceptance metric is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy.optimize import nnls

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
