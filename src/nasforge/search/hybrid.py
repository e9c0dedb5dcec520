"""The hybrid strategy: prior-steered evolution screened by a surrogate learned from the trials.

Mechanism (all of it computed from the study's own trials, so it resumes from storage):

1. **Initial population** (``n_init`` trials): a balanced design (every choice of every parameter
   used equally often, ties at random), or draws from the op-probability **prior** when one is
   given — the "gradient information": e.g. the softmax of DARTS / supernet architecture weights
   per edge.
2. **Surrogate**: per objective, an evidence-maximized Bayesian linear regression on one-hot
   features of the parameters plus the search space's structural features, if it has any
   (:meth:`nasforge.space.base.SearchSpace.surrogate_features`; for NAS-Bench-201 cells: the
   one-hot of the ops on *active* edges, i.e. edges on an input-to-output path, op counts, and
   per input-to-output path whether it is live and its op counts, i.e. its depth; the encoding
   alone determines them all), plus, when a prior is given, the prior log-probability of the
   point as one more feature, so the data decide how much the gradient information is trusted.
   ``surrogate="gp"`` uses a Gaussian process on the same features instead
   (:mod:`nasforge.search.gp_surrogate`, radial plus linear kernel, hyperparameters by
   evidence). Measured at budget 100 (20 seeds, median HV gap, problems a / c of
   ``benchmarks/bench_search_nb201.py``): linear 0.042 / 0.135, GP 0.046 / 0.173, GP with
   ``reference=1.5`` 0.042 / 0.150; the GP ranks held-out cells better (Kendall tau among the
   top fifth, 100 random cells: 0.35 vs 0.26) but the search is held back by the acquisition on
   three objectives, not the surrogate, so the cheaper linear model stays the default. Targets
   are rank-based normal scores of the evaluated values (robust to the heavy tail of broken
   cells, and order-preserving so Pareto dominance is unchanged).
3. **Selection** (Thompson sampling, as in TSEMO, tempered): draw one surrogate from the
   posterior per objective (with the GP: jointly over the few hundred candidates that are
   promising under some plausible draw, the posterior mean elsewhere), its deviation from the
   posterior mean scaled by ``exploration`` (1: plain Thompson sampling; the default 0.5
   exploits more, which measured better within a few hundred evaluations), and predict every
   candidate; score candidates by their hypervolume improvement over the evaluated front (in
   the normal-score space, scaled to the evaluated range, reference point ``reference``, 1.1 by
   default; exact for two objectives, Monte Carlo otherwise, then only for the candidates a
   random augmented Chebyshev scalarization (ParEGO) ranks best), tie-broken
   by that scalarization; evaluate the best unvisited candidate. ``acquisition="chebyshev"``
   uses the scalarization alone (cheaper). Candidates are the whole space when it is small
   (NAS-Bench-201: 15,625 cells) — or, with probability ``p_mutation``, only the one-edit
   mutations of the current non-dominated trials (the evolutionary move: exploit the
   neighbourhood of the front, screened by the surrogate). For spaces too large to enumerate
   the global pool is a random sample (from the prior, if any) plus those mutations.
4. **Constraints** (Optuna's ``constraints_func``, ``<= 0`` satisfied): each constraint is learned
   like an objective, by the linear surrogate (on normal scores of its values, the threshold 0
   mapped into that scale), giving every candidate a probability of feasibility (the product
   over constraints, from the posterior predictive). Candidates predicted infeasible
   (probability < 1/2) are not proposed while any candidate is predicted feasible; the
   improvement is measured over the front of the *feasible* trials and weighted by the
   probability of feasibility. Until a feasible trial exists, the most probably feasible
   candidate is proposed.
5. **Validity** (``is_valid``): points it rejects are removed from every pool, so they are never
   proposed (for NAS-Bench-201, cells with no input-to-output path).

The surrogate never sees anything but evaluated trials; the prior is optional.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from nasforge.errors import ConfigError
from nasforge.search.base import (
    ArchSampler,
    ConstraintsFunc,
    IsValid,
    Prior,
    SearchSpace,
    violations,
)
from nasforge.search.gp_surrogate import CrossKernelCache, thompson_draw
from nasforge.search.pareto import is_non_dominated
from nasforge.space.base import FeatureFn
from nasforge.space.registry import surrogate_features


def one_hot(idx: np.ndarray, sizes: list[int]) -> np.ndarray:
    """One-hot encode ``(n, d)`` choice indices into ``(n, sum(sizes))``."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    out = np.zeros((len(idx), int(sum(sizes))))
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    out[rows, (idx + offsets).reshape(-1)] = 1.0
    return out


def default_features(names: list[str], choices: list[list[Any]]) -> FeatureFn | None:
    """The structural features of the registered search space whose encoding the parameters
    are (:meth:`nasforge.space.base.SearchSpace.surrogate_features`; NAS-Bench-201 cells have
    some), else None (one-hot only)."""
    return surrogate_features(names, choices)


def normal_scores(y: np.ndarray) -> np.ndarray:
    """Rank-based normal scores of each column (ties share the average rank)."""
    n = len(y)
    return norm.ppf((rankdata(y, axis=0) - 0.5) / n)


class HybridSampler(ArchSampler):
    """Prior-steered evolution with a surrogate screen (see the module docstring).

    Args:
        seed: random seed.
        search_space: ``{param: choices}`` (or None: the study's categorical space).
        prior: optional op-probability prior ``{param: {choice: p}}`` (gradient information).
        n_init: size of the initial population.
        p_mutation: probability of restricting a proposal to mutations of the front.
        max_pool: largest space enumerated in full.
        features: extra feature function of ``(n, d)`` choice indices (default: the structural
            features of the search space the parameters encode, see :func:`default_features`).
        rho: weight of the linear term of the augmented Chebyshev scalarization.
        acquisition: "hvi" (hypervolume improvement) or "chebyshev".
        exploration: scale of the posterior deviation in the Thompson draws (1: plain Thompson
            sampling; smaller exploits the posterior mean more; 0.5 measured best on the
            NAS-Bench-201 problems at budget 100, see ``benchmarks/results/search_nb201.md``).
        hvi_samples: Monte Carlo samples of the improvement for 3+ objectives (exact for 2).
        surrogate: "linear" (Bayesian linear regression, the default) or "gp" (Gaussian
            process, :mod:`nasforge.search.gp_surrogate`) for the objectives; constraints always
            use the linear one.
        reference: the hypervolume reference point in every objective, in the acquisition's
            scale where the evaluated values span 0 (best) to 1 (worst); larger values reward
            extending the front's ends more.
        constraints_func: Optuna's constraints (``<= 0`` satisfied), see :class:`ArchSampler`.
        is_valid: ``params -> bool``; rejected points are never proposed.
    """

    def __init__(
        self,
        seed: int | None = None,
        search_space: SearchSpace | None = None,
        prior: Prior | None = None,
        n_init: int = 5,
        p_mutation: float = 0.1,
        max_pool: int = 50_000,
        features: FeatureFn | None = None,
        rho: float = 0.05,
        acquisition: str = "hvi",
        exploration: float = 0.5,
        hvi_samples: int = 2048,
        surrogate: str = "linear",
        reference: float = 1.1,
        *,
        constraints_func: ConstraintsFunc | None = None,
        is_valid: IsValid | None = None,
    ) -> None:
        super().__init__(
            seed, search_space, prior, constraints_func=constraints_func, is_valid=is_valid
        )
        if n_init < 2 or not 0.0 <= p_mutation <= 1.0 or max_pool < 1:
            raise ConfigError("hybrid needs n_init >= 2, 0 <= p_mutation <= 1, max_pool >= 1")
        self._n_init = n_init
        self._p_mut = p_mutation
        self._max_pool = max_pool
        self._features = features
        self._rho = rho
        if acquisition not in ("hvi", "chebyshev"):
            raise ConfigError(
                f"hybrid acquisition must be 'hvi' or 'chebyshev', got {acquisition!r}"
            )
        self._acquisition = acquisition
        if not exploration >= 0 or hvi_samples < 16:
            raise ConfigError("hybrid needs exploration >= 0 and hvi_samples >= 16")
        self._explore = float(exploration)
        self._hvi_samples = int(hvi_samples)
        if surrogate not in ("gp", "linear"):
            raise ConfigError(f"hybrid surrogate must be 'gp' or 'linear', got {surrogate!r}")
        self._surrogate = surrogate
        if not reference > 1.0:
            raise ConfigError(f"hybrid reference must be > 1, got {reference!r}")
        self._reference = float(reference)
        self._gp_key: tuple | None = None
        self._gp_cache: CrossKernelCache | None = None
        self._gp_memo: dict[int, tuple[int, tuple[float, float, float]]] = {}
        self._cache_key: tuple | None = None
        self._all: np.ndarray | None = None
        self._all_feats: np.ndarray | None = None
        self._all_valid: np.ndarray | None = None

    # -- features ---------------------------------------------------------------------------

    def _feature_fn(self, names: list[str], choices: list[list[Any]]) -> FeatureFn:
        sizes = [len(c) for c in choices]
        extra = self._features or default_features(names, choices)

        def fn(idx: np.ndarray) -> np.ndarray:
            parts = [one_hot(idx, sizes)]
            if extra is not None:
                parts.append(extra(idx))
            return np.hstack(parts)

        return fn

    def _prior_feature(self, idx: np.ndarray, prior: list[np.ndarray] | None) -> np.ndarray:
        if prior is None:
            return np.zeros((len(idx), 0))
        logp = sum(np.log(prior[k][idx[:, k]] + 1e-3) for k in range(idx.shape[1]))
        return np.asarray(logp, dtype=float).reshape(-1, 1)

    def _enumerate(self, names: list[str], choices: list[list[Any]], fn: FeatureFn) -> None:
        key = (tuple(names), tuple(tuple(c) for c in choices))
        if key == self._cache_key:
            return
        sizes = [len(c) for c in choices]
        if int(np.prod(sizes, dtype=float)) <= self._max_pool:
            self._all = np.array(list(itertools.product(*[range(s) for s in sizes])), dtype=int)
            self._all_feats = fn(self._all)
            self._all_valid = self._valid_mask(names, choices, self._all)
        else:
            self._all, self._all_feats, self._all_valid = None, None, None
        self._cache_key = key

    # -- proposal ---------------------------------------------------------------------------

    def propose(self, names, choices, done, losses, taken, prior, constraints):  # noqa: D102
        if len(done) < self._n_init:
            return self._initial(choices, done, taken, prior)
        fn = self._feature_fn(names, choices)
        self._enumerate(names, choices, fn)
        viol = violations(constraints)
        feasible = np.ones(len(done), dtype=bool) if viol is None else viol <= 0
        if feasible.any():
            front = done[feasible][is_non_dominated(losses[feasible])]
        else:  # nothing feasible yet: grow from the least-violating trials
            front = done[viol == viol.min()]  # type: ignore[union-attr]
        if self._rng.random() < self._p_mut:
            pool = self._neighbours(front, choices, taken, names)
            feats = fn(pool) if len(pool) else None
        else:
            pool, feats = self._global_pool(choices, front, taken, fn, prior, names)
        if len(pool) == 0:
            pool, feats = self._global_pool(choices, front, taken, fn, prior, names)
        if len(pool) == 0:
            return self._fresh_random(choices, taken, prior)
        assert feats is not None
        feats = np.hstack([feats, self._prior_feature(pool, prior)])
        train = np.hstack([fn(done), self._prior_feature(done, prior)])
        ids = None
        if self._surrogate == "gp" and self._all is not None:
            ids = (self._gp_cache_for(prior), self._flat(done, choices), self._flat(pool, choices))
        scores = self._acquisition_scores(train, losses, feats, constraints, feasible, ids)
        return pool[int(np.argmin(scores))]

    @staticmethod
    def _flat(idx: np.ndarray, choices) -> np.ndarray:
        """Row of each point in the enumerated space (mixed radix, last parameter fastest)."""
        sizes = np.array([len(c) for c in choices])
        strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]])
        return np.asarray(idx, dtype=int) @ strides

    def _gp_cache_for(self, prior: list[np.ndarray] | None) -> CrossKernelCache:
        """The GP's cross-kernel cache over the enumerated space (features incl. the prior)."""
        key = (self._cache_key, None if prior is None else tuple(map(tuple, prior)))
        if key != self._gp_key or self._gp_cache is None:
            assert self._all is not None and self._all_feats is not None
            feats = np.hstack([self._all_feats, self._prior_feature(self._all, prior)])
            self._gp_cache, self._gp_key = CrossKernelCache(feats), key
        return self._gp_cache

    def _initial(self, choices, done, taken, prior) -> np.ndarray:
        """Balanced design: least-used choice per parameter (or a prior draw), not yet taken."""
        for _ in range(100):
            if prior is not None:
                x = self._random_index(choices, prior)
            else:
                x = np.empty(len(choices), dtype=int)
                for k, c in enumerate(choices):
                    counts = np.bincount(done[:, k], minlength=len(c)) if len(done) else None
                    if counts is None:
                        x[k] = self._rng.integers(len(c))
                    else:
                        least = np.flatnonzero(counts == counts.min())
                        x[k] = self._rng.choice(least)
            if tuple(int(v) for v in x) not in taken:
                return x
        return self._fresh_random(choices, taken, prior)

    def _neighbours(self, front: np.ndarray, choices, taken, names=None) -> np.ndarray:
        out = set()
        for parent in front:
            for k, c in enumerate(choices):
                for v in range(len(c)):
                    if v != parent[k]:
                        child = parent.copy()
                        child[k] = v
                        key = tuple(int(a) for a in child)
                        if key not in taken:
                            out.add(key)
        pool = np.array(sorted(out), dtype=int).reshape(-1, len(choices))
        if self._is_valid is not None and len(pool):
            pool = pool[self._valid_mask(names, choices, pool)]
        return pool

    def _global_pool(
        self, choices, front, taken, fn, prior, names=None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._all is not None and self._all_feats is not None:
            sizes = np.array([len(c) for c in choices])
            strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]])
            taken_flat = np.array([np.dot(t, strides) for t in taken], dtype=int)
            mask = self._all_valid.copy() if self._all_valid is not None else None
            if mask is None:
                mask = np.ones(len(self._all), dtype=bool)
            mask[taken_flat] = False
            return self._all[mask], self._all_feats[mask]
        sample = np.array([self._random_index(choices, prior) for _ in range(2000)], dtype=int)
        pool = np.unique(
            np.vstack([sample, self._neighbours(front, choices, taken, names)]), axis=0
        )
        keep = np.array([tuple(int(a) for a in x) not in taken for x in pool], dtype=bool)
        pool = pool[keep]
        if self._is_valid is not None and len(pool):
            pool = pool[self._valid_mask(names, choices, pool)]
        return pool, fn(pool)

    def _acquisition_scores(
        self,
        train: np.ndarray,
        losses: np.ndarray,
        cand: np.ndarray,
        constraints: np.ndarray | None = None,
        feasible: np.ndarray | None = None,
        enumerated: tuple[CrossKernelCache, np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Acquisition score of every candidate from one Thompson draw (lower is better).

        ``enumerated``: the GP's cache of the enumerated space with the rows of the evaluated
        points and of the candidates in it (None: features only).
        """
        z = normal_scores(losses)
        m = z.shape[1]
        x_mean = train.mean(axis=0)
        xc = train - x_mean
        if self._surrogate == "gp":
            cache, train_ids, cand_ids = enumerated or (None, None, None)
            preds = thompson_draw(
                train,
                z,
                cand,
                self._rng,
                self._explore,
                cache=cache,
                train_ids=train_ids,
                cand_ids=cand_ids,
                memo=self._gp_memo,
            )
        else:
            draws = np.stack(
                [
                    bayesian_linear_draw(
                        xc, z[:, j] - z[:, j].mean(), self._rng, scale=self._explore
                    )
                    for j in range(m)
                ],
                axis=1,
            )
            preds = cand @ draws - x_mean @ draws + z.mean(axis=0)
        lo, hi = z.min(axis=0), z.max(axis=0)
        scaled = (preds - lo) / np.maximum(hi - lo, 1e-9)
        w = self._rng.dirichlet(np.ones(m))
        cheb = np.max(w * scaled, axis=1) + self._rho * (scaled @ w)
        pof = self._feasibility(xc, cand - x_mean, constraints)
        if feasible is None:
            feasible = np.ones(len(z), dtype=bool)
        if pof is not None and not feasible.any():
            # No feasible trial yet: find one (most probably feasible, then the scalarization).
            return -pof + 1e-3 * (cheb - cheb.min()) / max(float(np.ptp(cheb)), 1e-9)
        eligible = np.ones(len(cand), dtype=bool)
        if pof is not None:
            eligible = pof >= 0.5
            if not eligible.any():  # nothing predicted feasible: the most probable first
                return -pof + 1e-3 * (cheb - cheb.min()) / max(float(np.ptp(cheb)), 1e-9)
        cheb_e = np.where(eligible, cheb, np.inf)
        if self._acquisition == "chebyshev":
            return (
                cheb_e if pof is None else np.where(eligible, cheb / np.maximum(pof, 1e-9), np.inf)
            )
        zf = z[feasible]
        front = (zf[is_non_dominated(zf)] - lo) / np.maximum(hi - lo, 1e-9)
        # Improvement is estimated only for the best-scalarized candidates (cost control).
        top = np.argsort(cheb_e)[: min(1024, int(eligible.sum()))]
        hvi = np.zeros(len(cand))
        ref = np.full(m, self._reference)
        if m == 2:  # exact and cheap: every eligible candidate
            top = np.flatnonzero(eligible)
            hvi[top] = hypervolume_improvement_2d(scaled[top], front, ref)
        else:
            hvi[top] = mc_hypervolume_improvement(
                scaled[top], front, ref, self._rng, self._hvi_samples
            )
        if pof is not None:
            hvi = hvi * pof
        # Candidates with no predicted improvement are ranked by the scalarization, after all
        # candidates with some; ineligible ones last.
        return np.where(eligible, np.where(hvi > 0, -hvi, 1.0 + cheb - cheb.min()), np.inf)

    def _feasibility(
        self, xc: np.ndarray, cand_c: np.ndarray, constraints: np.ndarray | None
    ) -> np.ndarray | None:
        """Predicted probability that each candidate satisfies every constraint (None: none)."""
        if constraints is None or constraints.ndim != 2 or constraints.shape[1] == 0:
            return None
        pof = np.ones(len(cand_c))
        for j in range(constraints.shape[1]):
            c = constraints[:, j]
            known = np.isfinite(c)
            if known.sum() < 2:
                continue
            zc = normal_scores(c[known].reshape(-1, 1))[:, 0]
            ok = c[known] <= 0
            # The threshold 0 in the normal-score scale (the transform is monotone).
            if ok.all():
                t = zc.max() + 1.0
            elif not ok.any():
                t = zc.min() - 1.0
            else:
                t = 0.5 * (zc[ok].max() + zc[~ok].min())
            x = xc[known] - xc[known].mean(axis=0)
            mu, sd = bayesian_linear_predict(x, zc - zc.mean(), cand_c - xc[known].mean(axis=0))
            pof *= norm.cdf((t - zc.mean() - mu) / sd)
        return pof


def hypervolume_improvement_2d(
    points: np.ndarray, front: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """Exact hypervolume improvement of each 2-D point over ``front`` (losses, minimized).

    ``HVI(p) = vol(box(p, ref)) - HV({max(f, p) : f in front})``: the part of ``p``'s box the
    front already dominates, clipped to the box, is a 2-D staircase swept in one sort. Points the
    front weakly dominates (found by one binary search each) get exactly 0 without the sweep.
    """
    p = np.minimum(points, reference)
    box = np.prod(np.clip(reference - p, 0.0, None), axis=1)
    if len(front) == 0:
        return box
    order = np.argsort(front[:, 0], kind="stable")
    fx, fy = front[order, 0], np.minimum.accumulate(front[order, 1])
    k = np.searchsorted(fx, points[:, 0], side="right")
    dominated = (k > 0) & (fy[np.maximum(k - 1, 0)] <= points[:, 1])
    out = np.zeros(len(points))
    live = np.flatnonzero(~dominated & (box > 0))
    if len(live) == 0:
        return out
    p = p[live]
    # (n, k, 2): each front point clipped into each box (a point beyond the reference covers
    # nothing)
    q = np.minimum(np.maximum(front[None, :, :], p[:, None, :]), reference)
    srt = np.argsort(q[:, :, 0], axis=1)
    x = np.take_along_axis(q[:, :, 0], srt, axis=1)
    y = np.minimum.accumulate(np.take_along_axis(q[:, :, 1], srt, axis=1), axis=1)
    x_next = np.concatenate([x[:, 1:], np.full((len(p), 1), reference[0])], axis=1)
    covered = np.sum((x_next - x) * np.clip(reference[1] - y, 0.0, None), axis=1)
    out[live] = np.clip(box[live] - covered, 0.0, None)
    return out


def mc_hypervolume_improvement(
    points: np.ndarray,
    front: np.ndarray,
    reference: np.ndarray,
    rng: np.random.Generator,
    samples: int = 2048,
) -> np.ndarray:
    """Monte Carlo hypervolume improvement of each point over ``front`` (losses, minimized).

    Uniform samples in the box between the best coordinates and ``reference`` that ``front`` does
    not dominate; a point's improvement is the box volume times the share of those samples it
    dominates. Points dominated by the front (or outside the reference) get exactly 0.
    """
    out = np.zeros(len(points))
    inside = np.all(points < reference, axis=1)
    dominated = np.zeros(len(points), dtype=bool)
    for f in front:
        dominated |= np.all(points >= f, axis=1)
    keep = np.flatnonzero(inside & ~dominated)
    if len(keep) == 0:
        return out
    lower = np.minimum(points[keep].min(axis=0), front.min(axis=0))
    u = lower + rng.random((samples, len(reference))) * (reference - lower)
    free = np.ones(samples, dtype=bool)
    for f in front:
        free &= ~np.all(u >= f, axis=1)
    u = u[free]
    if len(u) == 0:
        return out
    vol = float(np.prod(reference - lower)) / samples
    for start in range(0, len(keep), 512):
        block = points[keep[start : start + 512]]
        dom = np.all(block[:, None, :] <= u[None, :, :], axis=2)
        out[keep[start : start + 512]] = vol * dom.sum(axis=1)
    return out


def bayesian_linear_fit(
    x: np.ndarray, y: np.ndarray, iters: int = 30
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Evidence-maximized Bayesian linear regression (centered ``x``, ``y``).

    Prior ``w ~ N(0, 1/alpha)``, noise precision ``beta``; both set by evidence maximization
    (MacKay's fixed-point updates, as scikit-learn's ``BayesianRidge`` does) but through one
    eigendecomposition of ``x.T @ x``, which keeps a fit to ~1 ms at these sizes.

    Returns:
        ``(v, mean_e, prec_e, beta)``: eigenvectors of ``x.T @ x``, the posterior mean and
        precision of the weights in that basis, and the noise precision.
    """
    n, d = x.shape
    s, v = np.linalg.eigh(x.T @ x)
    s = np.clip(s, 0.0, None)
    xty = v.T @ (x.T @ y)
    alpha, beta = 1.0, 1.0 / max(float(np.var(y)), 1e-9)
    for _ in range(iters):
        mean_e = beta * xty / (alpha + beta * s)  # posterior mean in the eigenbasis
        gamma = float(np.sum(beta * s / (alpha + beta * s)))
        resid = float(np.sum((y - x @ (v @ mean_e)) ** 2))
        alpha = gamma / max(float(mean_e @ mean_e), 1e-12)
        beta = max(n - gamma, 1e-6) / max(resid, 1e-12)
    mean_e = beta * xty / (alpha + beta * s)
    return v, mean_e, alpha + beta * s, beta


def bayesian_linear_draw(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, iters: int = 30, scale: float = 1.0
) -> np.ndarray:
    """One posterior draw of the weights of :func:`bayesian_linear_fit`'s regression (its
    deviation from the posterior mean multiplied by ``scale``)."""
    v, mean_e, prec_e, _ = bayesian_linear_fit(x, y, iters)
    return v @ (mean_e + scale * rng.standard_normal(len(mean_e)) / np.sqrt(prec_e))


def bayesian_linear_predict(
    x: np.ndarray, y: np.ndarray, cand: np.ndarray, iters: int = 30
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior predictive mean and standard deviation at ``cand`` (centered like ``x``)."""
    v, mean_e, prec_e, beta = bayesian_linear_fit(x, y, iters)
    proj = cand @ v
    var = (proj**2) @ (1.0 / prec_e) + 1.0 / beta
    return proj @ mean_e, np.sqrt(np.maximum(var, 1e-12))
