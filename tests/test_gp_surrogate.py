"""The hybrid strategy's GP surrogate: evidence fit, cached vs direct kernels, Thompson draws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kendalltau

from nasforge.search.gp_surrogate import (
    CrossKernelCache,
    FeatureSpace,
    fit_gp,
    thompson_draw,
)
from nasforge.search.hybrid import HybridSampler, bayesian_linear_predict, one_hot
from nasforge.space import nb201
from nasforge.space.cell_space import _nb201_paths, nb201_active_features


def _space_feats() -> np.ndarray:
    idx = np.array(list(itertools.product(*[range(5)] * 6)))
    return np.hstack([one_hot(idx, [5] * 6), nb201_active_features(idx)])


FEATS = _space_feats()


def test_fit_recovers_a_nonlinear_function_better_than_its_mean() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(80, 3))
    y = np.sin(2 * x[:, 0]) + x[:, 1] ** 2 - x[:, 2]
    space = FeatureSpace(x)
    xs = space.standardize(x)
    fit = fit_gp(space, xs[:60], y[:60])
    pred = space.kernel(xs[60:], xs[:60], fit.ell, fit.lin) @ fit.alpha + fit.y_mean
    assert np.mean((pred - y[60:]) ** 2) < 0.3 * np.var(y[60:])
    assert fit.noise in (0.1, 0.2)  # a noiseless function: the evidence picks a small noise


def test_constant_targets_and_constant_features_do_not_break_the_fit() -> None:
    x = np.hstack([np.random.default_rng(1).random((10, 2)), np.ones((10, 1))])
    space = FeatureSpace(x)
    fit = fit_gp(space, space.standardize(x), np.zeros(10))
    assert np.allclose(fit.alpha, 0.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 60), m=st.integers(1, 3))
def test_cached_and_direct_draws_agree(seed: int, n: int, m: int) -> None:
    """The cross-kernel cache changes the cost, not the draw (same stream, float32 tolerance)."""
    rng = np.random.default_rng(seed)
    train_ids = rng.choice(len(FEATS), n, replace=False)
    cand_ids = np.setdiff1d(rng.choice(len(FEATS), 3000, replace=False), train_ids)
    z = rng.standard_normal((n, m))
    cache = CrossKernelCache(FEATS)
    cached = thompson_draw(
        FEATS[train_ids],
        z,
        FEATS[cand_ids],
        np.random.default_rng(seed),
        0.5,
        cache=cache,
        train_ids=train_ids,
        cand_ids=cand_ids,
    )
    # Direct path standardized over the same reference set as the cache.
    space = cache.space
    xt, xc = space.standardize(FEATS[train_ids]), space.standardize(FEATS[cand_ids])
    fits = [fit_gp(space, xt, z[:, j]) for j in range(m)]
    means = np.stack(
        [space.kernel(xc, xt, f.ell, f.lin) @ f.alpha + f.y_mean for f in fits], axis=1
    )
    assert cached.shape == (len(cand_ids), m)
    assert np.all(np.isfinite(cached))
    # Outside the jointly drawn few hundred, the draw is the posterior mean.
    same = np.isclose(cached, means, atol=1e-3).all(axis=1)
    assert same.sum() >= len(cand_ids) - 400


def test_cache_serves_columns_in_any_order_and_grows() -> None:
    cache = CrossKernelCache(FEATS)
    a = cache.cross(np.array([5, 9, 100]), 1.0, 1.0).copy()
    b = cache.cross(np.array([100, 5, 9, 7]), 1.0, 1.0)
    assert np.allclose(a[:, [2, 0, 1]], b[:, :3])
    direct = cache.space.kernel(cache.x, cache.x[[100, 5, 9, 7]], 1.0, 1.0)
    assert np.allclose(b, direct, atol=1e-4)


def test_gp_ranks_held_out_cells_of_a_structured_function() -> None:
    """On a function of the cells' structure that is not additive (minus the largest number of
    convolutions on one live input-to-output path), the GP's mean ranks held-out cells well from
    100 evaluations, better than the additive (linear) model on the same features."""
    idx = np.array(list(itertools.product(*[range(5)] * 6)))
    conv = (idx == nb201.OPS.index("nor_conv_1x1")) | (idx == nb201.OPS.index("nor_conv_3x3"))
    live = idx != nb201.OPS.index("none")
    depth = np.stack(
        [np.where(live[:, p].all(axis=1), conv[:, p].sum(axis=1), -1) for p in _nb201_paths()],
        axis=1,
    )
    truth = -depth.max(axis=1).astype(float)
    rng = np.random.default_rng(3)
    tr = rng.choice(len(idx), 100, replace=False)
    te = np.setdiff1d(np.arange(len(idx)), tr)[:2000]
    cache = CrossKernelCache(FEATS)
    pred = thompson_draw(
        FEATS[tr],
        truth[tr, None],
        FEATS[te],
        rng,
        0.0,
        cache=cache,
        train_ids=tr,
        cand_ids=te,
    )
    tau_gp = kendalltau(pred[:, 0], truth[te])[0]
    x = FEATS[tr] - FEATS[tr].mean(axis=0)
    lin, _ = bayesian_linear_predict(
        x, truth[tr] - truth[tr].mean(), FEATS[te] - FEATS[tr].mean(axis=0)
    )
    tau_lin = kendalltau(lin, truth[te])[0]
    assert tau_gp > 0.7
    assert tau_gp > tau_lin


@pytest.mark.parametrize("surrogate", ["gp", "linear"])
def test_hybrid_runs_with_either_surrogate(surrogate: str) -> None:
    import optuna

    from nasforge.search.tabular import is_connected_cell

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = HybridSampler(
        seed=0, search_space=nb201.search_space(), surrogate=surrogate, is_valid=is_connected_cell
    )
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for _ in range(15):
        t = study.ask(
            {
                p: optuna.distributions.CategoricalDistribution(list(nb201.OPS))
                for p in nb201.PARAM_NAMES
            }
        )
        spec = nb201.CellSpec.from_params(t.params)
        convs = sum(op.startswith("nor_conv") for op in spec.ops)
        study.tell(t, [-convs, convs + 0.1 * spec.ops.count("avg_pool_3x3")])
    numbers = {tuple(t.params.values()) for t in study.trials}
    assert len(numbers) == 15  # never proposes a cell twice
    assert all(is_connected_cell(t.params) for t in study.trials)


def test_unknown_surrogate_is_a_config_error() -> None:
    from nasforge.errors import ConfigError

    with pytest.raises(ConfigError, match="surrogate must be 'gp' or 'linear'"):
        HybridSampler(seed=0, surrogate="forest")
