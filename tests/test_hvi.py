"""The hybrid's hypervolume improvement against the definition: HV(front + p) - HV(front)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from nasforge.search.hybrid import hypervolume_improvement_2d, mc_hypervolume_improvement
from nasforge.search.pareto import hypervolume, pareto_front

points = st.lists(st.tuples(st.floats(0, 1.3), st.floats(0, 1.3)), min_size=1, max_size=12).map(
    np.array
)


def _brute(p: np.ndarray, front: np.ndarray, ref: np.ndarray) -> float:
    inside = front[np.all(front < ref, axis=1)]
    base = hypervolume(inside, ref) if len(inside) else 0.0
    both = np.vstack([inside, p[None, :]]) if np.all(p < ref) else inside
    return (hypervolume(both, ref) if len(both) else 0.0) - base


@settings(max_examples=300, deadline=None)
@given(front=points, cand=points)
def test_exact_2d_improvement_is_the_definition(front: np.ndarray, cand: np.ndarray) -> None:
    ref = np.array([1.1, 1.1])
    front = pareto_front(front)
    got = hypervolume_improvement_2d(cand, front, ref)
    want = np.array([_brute(p, front, ref) for p in cand])
    assert np.allclose(got, want, atol=1e-9)
    assert np.all(got >= 0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_monte_carlo_improvement_estimates_the_definition_in_3d(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = np.full(3, 1.1)
    front = pareto_front(rng.random((8, 3)))
    cand = rng.random((5, 3))
    got = mc_hypervolume_improvement(cand, front, ref, rng, samples=200_000)
    want = np.array([_brute(p, front, ref) for p in cand])
    assert np.allclose(got, want, atol=0.01)
    dominated = np.array([np.any(np.all(p >= front, axis=1)) for p in cand])
    assert np.all(got[dominated] == 0.0)
