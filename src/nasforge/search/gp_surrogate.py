"""Gaussian-process surrogate of the hybrid strategy: Thompson draws over a finite candidate set.

Why a GP and not only the Bayesian linear model: on the NAS-Bench-201 tables an additive model of
the cell's features ranks the accurate cells poorly (Kendall tau among the top fifth of held-out
cells, 100 random training cells, CIFAR-10: 0.26 linear vs 0.35 for this GP); interactions between
edges (what one op does depends on what feeds it) are what separates the best cells, and a
radial kernel over the same features captures them while its linear part keeps the additive
trend. In the search it is not yet a clear gain (``HybridSampler(surrogate="gp")``; 20 seeds,
budget 100, median HV gap on problems a / c of ``benchmarks/bench_search_nb201.py``): 0.046 /
0.173 against the linear model's 0.042 / 0.135, 0.042 / 0.150 with ``reference=1.5``, and
0.034 / 0.187 with unscaled features; on the three-objective problem c the acquisition, not the
surrogate, is what misses the accurate end of the front.

Written by hand because no library here does what the sampler needs at its sizes: an exact GP with
evidence-selected hyperparameters (a small grid: one Cholesky each, deterministic), its posterior
mean over every cell of the space (15,625) at every proposal, and *joint* posterior draws over the
few hundred most promising cells, in tens of milliseconds. The cross-kernel columns between the
enumerated space and each evaluated cell are computed once and kept
(:class:`CrossKernelCache`), since a study only ever adds evaluated cells.

Kernel, on features standardized over the candidate set (constant columns left at zero)::

    k(x, x') = exp(-|x - x'|^2 / (ell * M)) + lin * <x, x'> / F

with ``M`` the median squared distance between candidates, ``F`` the number of features, ``ell``
in :data:`LENGTHSCALES`, ``lin`` in :data:`LINEAR_WEIGHTS` and the noise standard deviation in
:data:`NOISES` (targets are normal scores, unit variance), picked per objective by the marginal
likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve, solve_triangular

LENGTHSCALES: tuple[float, ...] = (0.5, 1.0, 2.0)
"""RBF length scales, in units of the median squared distance between candidates."""
LINEAR_WEIGHTS: tuple[float, ...] = (0.0, 1.0)
"""Weights of the linear kernel (0: RBF only)."""
NOISES: tuple[float, ...] = (0.1, 0.2, 0.4, 0.7)
"""Observation noise standard deviations (in normal-score units)."""
REFIT_ALWAYS = 30
"""Below this many evaluated points the hyperparameters are selected at every draw."""
REFIT_EVERY = 10
"""Above it, they are selected again after this many new points."""
_MEDIAN_SAMPLE = 2000


@dataclass
class GPFit:
    """Selected hyperparameters and the factorized posterior of one objective."""

    ell: float
    lin: float
    noise: float
    chol: np.ndarray  # lower Cholesky factor of K + noise^2 I
    alpha: np.ndarray  # (K + noise^2 I)^-1 (y - mean)
    y_mean: float


class FeatureSpace:
    """Standardization and distance scale of a candidate set's features."""

    def __init__(self, reference: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=float)
        self.mu = ref.mean(axis=0)
        sd = ref.std(axis=0)
        self.sd = np.where(sd > 1e-12, sd, 1.0)
        x = self.standardize(ref)
        # Fixed subsample (not the sampler's stream): the scale is a function of the set alone.
        pick = np.random.default_rng(0).permutation(len(x))[:_MEDIAN_SAMPLE]
        sub = x[pick]
        sq = (sub * sub).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * sub @ sub.T, 0.0)
        pos = d2[d2 > 1e-12]
        self.median_d2 = float(np.median(pos)) if len(pos) else 1.0
        self.n_features = max(x.shape[1], 1)

    def standardize(self, feats: np.ndarray) -> np.ndarray:
        """Features centered and scaled like the reference set."""
        return (np.asarray(feats, dtype=float) - self.mu) / self.sd

    def kernel(self, a: np.ndarray, b: np.ndarray, ell: float, lin: float) -> np.ndarray:
        """Kernel matrix between standardized feature rows ``a`` and ``b``."""
        dots = a @ b.T
        return self.kernel_from(self.sq_dist(a, b, dots), dots, ell, lin)

    @staticmethod
    def sq_dist(a: np.ndarray, b: np.ndarray, dots: np.ndarray) -> np.ndarray:
        """Squared distances between rows of ``a`` and ``b`` given ``dots = a @ b.T``."""
        return np.maximum((a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2 * dots, 0)

    def kernel_from(self, d2: np.ndarray, dots: np.ndarray, ell: float, lin: float) -> np.ndarray:
        """Kernel matrix from squared distances and dot products."""
        out = np.exp(-d2 / (ell * self.median_d2))
        if lin:
            out += lin * dots / self.n_features
        return out

    def prior_variance(self, a: np.ndarray, lin: float) -> np.ndarray:
        """``k(x, x)`` of standardized rows ``a``."""
        return 1.0 + lin * (a * a).sum(axis=1) / self.n_features


class CrossKernelCache:
    """Kernel columns between every row of an enumerated feature set and the evaluated rows.

    Columns are float32, one matrix per length scale, grown as rows are evaluated; a study
    evaluates in order, so the usual request is a prefix and costs no copy.
    """

    def __init__(self, feats: np.ndarray) -> None:
        self.space = FeatureSpace(feats)
        self.x = self.space.standardize(feats)
        self._x32 = self.x.astype(np.float32)
        self._sq = (self._x32 * self._x32).sum(axis=1)
        self._pos: dict[int, int] = {}
        self._rbf: dict[float, np.ndarray] = {}
        self._dot = np.zeros((len(self.x), 0), dtype=np.float32)
        self._n = 0

    def _grow(self, ids: np.ndarray) -> None:
        new = [int(i) for i in dict.fromkeys(ids.tolist()) if int(i) not in self._pos]
        if not new:
            return
        need = self._n + len(new)
        if need > self._dot.shape[1]:
            cap = max(2 * self._dot.shape[1], need, 64)
            grown = np.zeros((len(self.x), cap), dtype=np.float32)
            grown[:, : self._n] = self._dot[:, : self._n]
            self._dot = grown
            for ell, mat in list(self._rbf.items()):
                g = np.zeros((len(self.x), cap), dtype=np.float32)
                g[:, : self._n] = mat[:, : self._n]
                self._rbf[ell] = g
        cols = self._x32 @ self._x32[new].T
        d2 = np.maximum(self._sq[:, None] + self._sq[new][None, :] - 2.0 * cols, 0.0)
        sl = slice(self._n, need)
        self._dot[:, sl] = cols
        for ell in LENGTHSCALES:
            if ell not in self._rbf:
                self._rbf[ell] = np.zeros_like(self._dot)
            self._rbf[ell][:, sl] = np.exp(-d2 / np.float32(ell * self.space.median_d2))
        for k, i in enumerate(new):
            self._pos[i] = self._n + k
        self._n = need

    def cross(self, ids: np.ndarray, ell: float, lin: float) -> np.ndarray:
        """``(N, len(ids))`` kernel between every enumerated row and the rows ``ids``."""
        ids = np.asarray(ids, dtype=int)
        self._grow(ids)
        pos = np.array([self._pos[int(i)] for i in ids], dtype=int)
        if len(pos) and np.array_equal(pos, np.arange(len(pos))):
            rbf, dot = self._rbf[ell][:, : len(pos)], self._dot[:, : len(pos)]
        else:
            rbf, dot = self._rbf[ell][:, pos], self._dot[:, pos]
        if not lin:
            return rbf
        return rbf + np.float32(lin / self.space.n_features) * dot


def fit_gp(
    space: FeatureSpace,
    x: np.ndarray,
    y: np.ndarray,
    hyper: tuple[float, float, float] | None = None,
) -> GPFit:
    """Exact GP on standardized rows ``x`` and targets ``y``; hyperparameters by evidence.

    Args:
        space: the feature space (kernel scale).
        x: standardized rows.
        y: targets.
        hyper: ``(ell, lin, noise)`` to use as they are; None: the best of the grid
            (:data:`LENGTHSCALES` x :data:`LINEAR_WEIGHTS` x :data:`NOISES`) by evidence.

    Raises:
        ValueError: no hyperparameter setting gives a positive-definite kernel (not expected:
            the noise floor keeps it positive definite).
    """
    n = len(y)
    y_mean = float(np.mean(y))
    yc = np.asarray(y, dtype=float) - y_mean
    best: tuple[float, GPFit] | None = None
    eye = np.eye(n)
    dots = x @ x.T
    d2 = space.sq_dist(x, x, dots)
    grid = (
        [hyper]
        if hyper is not None
        else [(e, w, s) for e in LENGTHSCALES for w in LINEAR_WEIGHTS for s in NOISES]
    )
    kernels: dict[tuple[float, float], np.ndarray] = {}
    for ell, lin, noise in grid:
        if (ell, lin) not in kernels:
            kernels[ell, lin] = space.kernel_from(d2, dots, ell, lin)
        try:
            c, low = cho_factor(kernels[ell, lin] + noise**2 * eye, lower=True)
        except LinAlgError:
            continue
        alpha = cho_solve((c, low), yc)
        evidence = -0.5 * float(yc @ alpha) - float(np.log(np.diag(c)).sum())
        if best is None or evidence > best[0]:
            best = (evidence, GPFit(ell, lin, noise, np.tril(c), alpha, y_mean))
    if best is None:
        raise ValueError("no positive-definite GP kernel for these points")
    return best[1]


def thompson_draw(
    train: np.ndarray,
    targets: np.ndarray,
    cand: np.ndarray,
    rng: np.random.Generator,
    scale: float = 1.0,
    *,
    cache: CrossKernelCache | None = None,
    train_ids: np.ndarray | None = None,
    cand_ids: np.ndarray | None = None,
    joint: int = 400,
    screen: int = 1200,
    memo: dict[int, tuple[int, tuple[float, float, float]]] | None = None,
) -> np.ndarray:
    """One tempered Thompson draw of every objective at every candidate.

    The posterior mean is computed at every candidate; the draw (its deviation from the mean times
    ``scale``) is joint over the ``joint`` candidates most promising by the optimistic value
    ``mean - 2 sd`` (taken per objective among the ``screen`` best by mean), and zero elsewhere:
    candidates that are good under no plausible draw keep their mean.

    Args:
        train: ``(n, F)`` features of the evaluated points (ignored with ``cache``).
        targets: ``(n, m)`` targets (normal scores, lower is better).
        cand: ``(N, F)`` features of the candidates (ignored with ``cache``).
        rng: the sampler's random stream.
        scale: multiplies the posterior deviation (1: plain Thompson sampling).
        cache: cross-kernel cache of the enumerated space; then ``train_ids`` and ``cand_ids``
            are its row indices.
        train_ids: rows of the evaluated points in ``cache``.
        cand_ids: rows of the candidates in ``cache``.
        joint: candidates drawn jointly.
        screen: candidates per objective whose posterior deviation is computed.
        memo: the caller's record of hyperparameters per objective, ``{j: (n, (ell, lin,
            noise))}``: they are selected anew (the whole grid) while there are under
            :data:`REFIT_ALWAYS` points or once :data:`REFIT_EVERY` points were added since the
            last selection, and reused otherwise (one Cholesky instead of the grid's).

    Returns:
        ``(N, m)`` drawn values.
    """
    if cache is not None:
        assert train_ids is not None and cand_ids is not None
        space, xt = cache.space, cache.x[train_ids]

        def cand_x(i: np.ndarray) -> np.ndarray:
            return cache.x[cand_ids[i]]

        n_cand = len(cand_ids)
    else:
        space = FeatureSpace(np.vstack([train, cand]))
        xt, xc = space.standardize(train), space.standardize(cand)

        def cand_x(i: np.ndarray) -> np.ndarray:
            return xc[i]

        n_cand = len(xc)
    m = targets.shape[1]
    fits = []
    n = len(xt)
    for j in range(m):
        last = memo.get(j) if memo is not None else None
        reuse = last is not None and n >= REFIT_ALWAYS and n - last[0] < REFIT_EVERY
        fit = fit_gp(space, xt, targets[:, j], last[1] if reuse else None)  # type: ignore[index]
        if memo is not None and not reuse:
            memo[j] = (n, (fit.ell, fit.lin, fit.noise))
        fits.append(fit)
    cross = []
    means = np.empty((n_cand, m))
    for j, f in enumerate(fits):
        if cache is not None:
            kc = cache.cross(train_ids, f.ell, f.lin)  # type: ignore[arg-type]
            means[:, j] = (kc @ f.alpha.astype(np.float32))[cand_ids] + f.y_mean
            cross.append(kc)
        else:
            kc = space.kernel(xc, xt, f.ell, f.lin)
            means[:, j] = kc @ f.alpha + f.y_mean
            cross.append(kc)
    per = max(1, screen // m)
    shortlist = np.unique(np.concatenate([np.argsort(means[:, j])[:per] for j in range(m)]))
    rows = cand_ids[shortlist] if cache is not None else shortlist
    vs, sds = [], []
    for j, f in enumerate(fits):
        k_s = np.asarray(cross[j][rows], dtype=float)
        v = solve_triangular(f.chol, k_s.T, lower=True)
        var = space.prior_variance(cand_x(shortlist), f.lin) - np.einsum("ij,ij->j", v, v)
        vs.append(v)
        sds.append(np.sqrt(np.maximum(var, 1e-12)))
    per_joint = max(1, joint // m)
    chosen = np.unique(
        np.concatenate(
            [np.argsort(means[shortlist, j] - 2.0 * sds[j])[:per_joint] for j in range(m)]
        )
    )
    out = means.copy()
    if scale == 0:
        return out
    xs = cand_x(shortlist[chosen])
    for j, f in enumerate(fits):
        v = vs[j][:, chosen]
        cov = space.kernel(xs, xs, f.ell, f.lin) - v.T @ v
        out[shortlist[chosen], j] += scale * _mvn_draw(cov, rng)
    return out


def _mvn_draw(cov: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw of ``N(0, cov)``: Cholesky with a small jitter (eigendecomposition if it fails).

    The standard normal vector is drawn first, so both paths consume the stream alike.
    """
    cov = 0.5 * (cov + cov.T)
    e = rng.standard_normal(len(cov))
    jitter = 1e-8 * max(float(np.mean(np.diag(cov))), 1e-12)
    try:
        return np.linalg.cholesky(cov + jitter * np.eye(len(cov))) @ e
    except np.linalg.LinAlgError:
        w, u = np.linalg.eigh(cov)
        return u @ (np.sqrt(np.clip(w, 0.0, None)) * e)
