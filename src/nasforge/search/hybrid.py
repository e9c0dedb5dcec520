"""The hybrid strategy: prior-steered evolution screened by a surrogate learned from the trials.

Mechanism (all of it computed from the study's own trials, so it resumes from storage):

1. **Initial population** (``n_init`` trials): a balanced design (every choice of every parameter
   used equally often, ties at random), or draws from the op-probability **prior** when one is
   given — the "gradient information": e.g. the softmax of DARTS / supernet architecture weights
   per edge.
2. **Surrogate**: per objective, a Bayesian linear regression (evidence-maximized) on
   one-hot features of the parameters plus optional structural features (for NAS-Bench-201
   cells: the one-hot of the ops on *active* edges, i.e. edges on an input-to-output path, which
   the encoding alone determines), plus, when a prior is given, the prior log-probability of the
   point as one more feature, so the data decide how much the gradient information is trusted.
   Targets are rank-based normal scores of the evaluated values (robust to the heavy tail of
   broken cells, and order-preserving so Pareto dominance is unchanged).
3. **Selection** (Thompson sampling, as in TSEMO): draw one surrogate from the posterior per
   objective and predict every candidate; score candidates by their Monte Carlo hypervolume
   improvement over the evaluated front (in the normal-score space, scaled to the evaluated
   range, reference point 1.1), pre-screened and tie-broken by a random augmented Chebyshev
   scalarization (ParEGO); evaluate the best unvisited candidate. ``acquisition="chebyshev"``
   uses the scalarization alone (cheaper). Candidates are the whole space when it is small
   (NAS-Bench-201: 15,625 cells) — or, with probability ``p_mutation``, only the one-edit
   mutations of the current non-dominated trials (the evolutionary move: exploit the
   neighbourhood of the front, screened by the surrogate). For spaces too large to enumerate
   the global pool is a random sample (from the prior, if any) plus those mutations.

The surrogate never sees anything but evaluated trials; the prior is optional.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from nasforge.errors import ConfigError
from nasforge.search.base import ArchSampler, Prior, SearchSpace
from nasforge.search.pareto import is_non_dominated
from nasforge.space import nb201

FeatureFn = Callable[[np.ndarray], np.ndarray]


def one_hot(idx: np.ndarray, sizes: list[int]) -> np.ndarray:
    """One-hot encode ``(n, d)`` choice indices into ``(n, sum(sizes))``."""
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    out = np.zeros((len(idx), int(sum(sizes))))
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    out[rows, (idx + offsets).reshape(-1)] = 1.0
    return out


def nb201_active_features(idx: np.ndarray) -> np.ndarray:
    """Structural features of NB201 cells given as ``(n, 6)`` indices into OPS.

    One-hot of the ops on active edges (on an input-to-output path), op counts over active edges
    and over all edges, and a flag for cells with no input-to-output path.
    """
    none = nb201.OPS.index("none")
    live = idx != none
    n = len(idx)
    from_in = np.zeros((n, nb201.N_NODES), dtype=bool)
    from_in[:, 0] = True
    for k, (dst, src) in enumerate(nb201.EDGES):
        from_in[:, dst] |= live[:, k] & from_in[:, src]
    to_out = np.zeros((n, nb201.N_NODES), dtype=bool)
    to_out[:, -1] = True
    for k in reversed(range(len(nb201.EDGES))):
        dst, src = nb201.EDGES[k]
        to_out[:, src] |= live[:, k] & to_out[:, dst]
    active = np.stack(
        [live[:, k] & from_in[:, s] & to_out[:, d] for k, (d, s) in enumerate(nb201.EDGES)], 1
    )
    n_ops = len(nb201.OPS)
    feats = one_hot(idx, [n_ops] * len(nb201.EDGES))
    active_oh = feats * np.repeat(active, n_ops, axis=1)
    # Op counts pooled over edges: few features that explain much, so the evidence-maximized
    # regression can lean on them while data are scarce and on the per-edge ones later.
    active_counts = active_oh.reshape(n, len(nb201.EDGES), n_ops).sum(axis=1)
    all_counts = feats.reshape(n, len(nb201.EDGES), n_ops).sum(axis=1)
    disconnected = (~active.any(axis=1)).astype(float)[:, None]
    return np.hstack([active_oh, active_counts, all_counts, disconnected])


def default_features(names: list[str], choices: list[list[Any]]) -> FeatureFn | None:
    """Structural features for known spaces (NB201 cells), else None (one-hot only)."""
    if tuple(names) == nb201.PARAM_NAMES and all(tuple(c) == nb201.OPS for c in choices):
        return nb201_active_features
    return None


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
        features: extra feature function of ``(n, d)`` choice indices (default: structural
            features for NB201 cells, none otherwise).
        rho: weight of the linear term of the augmented Chebyshev scalarization.
        acquisition: "hvi" (hypervolume improvement) or "chebyshev".
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
    ) -> None:
        super().__init__(seed, search_space, prior)
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
        self._cache_key: tuple | None = None
        self._all: np.ndarray | None = None
        self._all_feats: np.ndarray | None = None

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
        else:
            self._all, self._all_feats = None, None
        self._cache_key = key

    # -- proposal ---------------------------------------------------------------------------

    def propose(self, names, choices, done, losses, taken, prior):  # noqa: D102
        if len(done) < self._n_init:
            return self._initial(choices, done, taken, prior)
        fn = self._feature_fn(names, choices)
        self._enumerate(names, choices, fn)
        front = done[is_non_dominated(losses)]
        if self._rng.random() < self._p_mut:
            pool = self._neighbours(front, choices, taken)
            feats = fn(pool) if len(pool) else None
        else:
            pool, feats = self._global_pool(choices, front, taken, fn, prior)
        if len(pool) == 0:
            pool, feats = self._global_pool(choices, front, taken, fn, prior)
        if len(pool) == 0:
            return self._fresh_random(choices, taken, prior)
        assert feats is not None
        feats = np.hstack([feats, self._prior_feature(pool, prior)])
        train = np.hstack([fn(done), self._prior_feature(done, prior)])
        scores = self._acquisition_scores(train, losses, feats)
        return pool[int(np.argmin(scores))]

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

    def _neighbours(self, front: np.ndarray, choices, taken) -> np.ndarray:
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
        return np.array(sorted(out), dtype=int).reshape(-1, len(choices))

    def _global_pool(self, choices, front, taken, fn, prior) -> tuple[np.ndarray, np.ndarray]:
        if self._all is not None and self._all_feats is not None:
            sizes = np.array([len(c) for c in choices])
            strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]])
            taken_flat = np.array([np.dot(t, strides) for t in taken], dtype=int)
            mask = np.ones(len(self._all), dtype=bool)
            mask[taken_flat] = False
            return self._all[mask], self._all_feats[mask]
        sample = np.array([self._random_index(choices, prior) for _ in range(2000)], dtype=int)
        pool = np.unique(np.vstack([sample, self._neighbours(front, choices, taken)]), axis=0)
        keep = np.array([tuple(int(a) for a in x) not in taken for x in pool], dtype=bool)
        pool = pool[keep]
        return pool, fn(pool)

    def _acquisition_scores(
        self, train: np.ndarray, losses: np.ndarray, cand: np.ndarray
    ) -> np.ndarray:
        """Acquisition score of every candidate from one Thompson draw (lower is better)."""
        z = normal_scores(losses)
        m = z.shape[1]
        x_mean = train.mean(axis=0)
        draws = np.stack(
            [
                bayesian_linear_draw(train - x_mean, z[:, j] - z[:, j].mean(), self._rng)
                for j in range(m)
            ],
            axis=1,
        )
        preds = cand @ draws - x_mean @ draws + z.mean(axis=0)
        lo, hi = z.min(axis=0), z.max(axis=0)
        scaled = (preds - lo) / np.maximum(hi - lo, 1e-9)
        w = self._rng.dirichlet(np.ones(m))
        cheb = np.max(w * scaled, axis=1) + self._rho * (scaled @ w)
        if self._acquisition == "chebyshev":
            return cheb
        front = (z[is_non_dominated(z)] - lo) / np.maximum(hi - lo, 1e-9)
        # Improvement is estimated only for the best-scalarized candidates (cost control).
        top = np.argsort(cheb)[:1024]
        hvi = np.zeros(len(cand))
        hvi[top] = mc_hypervolume_improvement(scaled[top], front, np.full(m, 1.1), self._rng)
        # Candidates with no predicted improvement are ranked by the scalarization, after all
        # candidates with some.
        return np.where(hvi > 0, -hvi, 1.0 + cheb - cheb.min())


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


def bayesian_linear_draw(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, iters: int = 30
) -> np.ndarray:
    """One posterior draw of the weights of a Bayesian linear regression (centered ``x``, ``y``).

    Prior ``w ~ N(0, 1/alpha)``, noise precision ``beta``; both set by evidence maximization
    (MacKay's fixed-point updates, as scikit-learn's ``BayesianRidge`` does) but through one
    eigendecomposition of ``x.T @ x``, which keeps a fit to ~1 ms at these sizes.
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
    sample_e = mean_e + rng.standard_normal(d) / np.sqrt(alpha + beta * s)
    return v @ sample_e
