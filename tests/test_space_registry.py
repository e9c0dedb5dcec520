"""Search spaces as plug-ins: every registered space against the SearchSpace protocol (one
conformance suite, hundreds of seeded random specs each), the registry, and a third space added
as one module (tests/toy_space.py) running the search and train stages unchanged."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from nasforge.config import params_from_dict
from nasforge.errors import ConfigError, ModelFileError
from nasforge.models import build_network, load_model, read_meta
from nasforge.space import registry
from nasforge.space.base import SearchSpace
from nasforge.space.registry import get_space, space_names, space_of

INPUT = (1, 8, 8)
CLASSES = 10


@pytest.fixture
def toy():
    """Register the toy space (as importing its module does) for one test, then remove it."""
    from tests import toy_space

    registry.register(toy_space.ToySpace)
    yield toy_space
    registry._SPACES.pop("toy", None)


def _space(name: str) -> SearchSpace:
    # A small corner of the macro space keeps its networks quick to build.
    space = {"kind": name, "channels": 4, "macro": {"depths": [1, 2], "kernels": [3, 5]}}
    params = params_from_dict({"space": space}, "test")
    return get_space(name).from_params(params.space, INPUT, CLASSES)


def _random_points(space: SearchSpace, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    choices = space.choices()
    return [{k: rng.choice(v) for k, v in choices.items()} for _ in range(n)]


@pytest.fixture(params=["cell", "macro", "toy"])
def space(request) -> SearchSpace:
    if request.param == "toy":
        request.getfixturevalue("toy")
    return _space(request.param)


def test_builtin_spaces_are_registered_without_importing_them():
    assert space_names()[:2] == ("cell", "macro")
    assert space_of({}).name == registry.DEFAULT_SPACE == "cell"
    assert space_of({"space": "macro"}).name == "macro"


def test_codec_round_trips_and_display_is_unique(space):
    valid = space.validity()
    names = list(space.distributions())
    assert space.choices() == {n: list(d.choices) for n, d in space.distributions().items()}
    seen: dict[str, object] = {}
    for point in _random_points(space, 300, seed=1):
        spec = space.spec_from_params(point)
        assert space.spec_to_params(spec) == point
        record = json.loads(json.dumps(space.spec_record(spec)))
        assert record["arch_str"] == space.display(spec)
        assert space.spec_from_record(record) == spec
        assert seen.setdefault(space.display(spec), spec) == spec  # one name, one architecture
        if valid is not None:
            assert valid(point) in (True, False)
    teacher = space.teacher()
    assert set(space.spec_to_params(teacher)) == set(names)
    assert valid is None or valid(space.spec_to_params(teacher))


def test_bad_records_and_points_are_one_line_errors(space):
    with pytest.raises(ModelFileError):
        space.spec_from_record({"arch_str": "x"} if space.name != "cell" else {})
    point = _random_points(space, 1, seed=2)[0]
    point[next(iter(point))] = "no-such-choice"
    with pytest.raises(ConfigError):
        space.spec_from_params(point)


def test_networks_model_files_supernets_and_blocks_agree(space):
    valid = space.validity()
    points = [p for p in _random_points(space, 60, seed=3) if valid is None or valid(p)][:6]
    supernet = space.new_supernet()
    blocks = space.block_space()
    assert tuple(blocks.input_shape()) == INPUT
    keys = {b.key for b in blocks.blocks()}
    x = torch.randn(2, *INPUT)
    for point in points:
        spec = space.spec_from_params(point)
        net = space.build_network(spec).eval()
        assert net(x).shape == (2, CLASSES)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        meta = {"space": space.name, **space.model_fields(spec)}
        assert meta["arch_str"] == space.display(spec)
        assert {k: v.shape for k, v in build_network(meta).state_dict().items()} == shapes
        sub = space.inherited_subnet(supernet, spec, [torch.randn(4, *INPUT)])
        assert {k: v.shape for k, v in sub.state_dict().items()} == shapes
        counts = blocks.block_counts(spec)
        assert counts and set(counts) <= keys and all(n > 0 for n in counts.values())
    again = type(space).from_pareto({"space": space.name, **space.pareto_fields()}, INPUT)
    assert again.pareto_fields() == space.pareto_fields()


def test_surrogate_features_come_from_the_space_that_owns_the_encoding(space):
    dists = space.distributions()
    names, choices = list(dists), [list(d.choices) for d in dists.values()]
    fn = registry.surrogate_features(names, choices)
    assert fn is type(space).surrogate_features(names, choices)
    if fn is not None:
        idx = np.array(
            [
                [c.index(p[n]) for n, c in zip(names, choices, strict=True)]
                for p in _random_points(space, 50, 4)
            ]
        )
        feats = fn(idx)
        assert feats.shape[0] == 50 and np.all(np.isfinite(feats))
    assert registry.surrogate_features(["a"], [[1, 2]]) is None


def test_unknown_spaces_are_refused_everywhere(tmp_path):
    with pytest.raises(ConfigError, match="unknown search space 'tree'; known: cell, macro"):
        get_space("tree")
    with pytest.raises(ConfigError, match=r"space\.kind: .*unknown search space 'tree'"):
        params_from_dict({"space": {"kind": "tree"}}, "p")
    (tmp_path / "model.json").write_text(json.dumps({"space": "tree", "arch_str": "", "shape": {}}))
    with pytest.raises(ModelFileError, match="unknown search space 'tree'"):
        read_meta(tmp_path)


def test_a_name_is_registered_once(toy):
    class Impostor(toy.ToySpace):
        pass

    with pytest.raises(ConfigError, match="registered twice"):
        registry.register(Impostor)
    assert params_from_dict({"space": {"kind": "toy"}}, "p").space.kind == "toy"


def test_a_space_in_one_module_runs_the_search_and_train_stages(toy, digits_dir, tmp_path):
    """The toy space touches nothing in nasforge: the same stage bodies search and train it."""
    from nasforge.stages.runner import execute
    from tests.conftest import tiny_params

    params = tiny_params(
        run={"threads": 1},
        space={"kind": "toy"},
        search={
            "supernet_epochs": 1,
            "trials": 4,
            "latency_source": "measure",
            "objectives": ["error", "latency", "params"],
        },
        targets=["onnxruntime-cpu"],
        promote={"precision": "fp32"},
    )
    result = execute("search", params, tmp_path / "search", tracking=False, dataset=digits_dir)
    pareto = json.loads((tmp_path / "search" / "pareto.json").read_text())
    assert pareto["space"] == "toy" and pareto["toy_epochs"] == 1
    assert pareto["teacher"] == {"arch_str": "toy:w=8;d=2", "toy": [8, 2]}
    history = json.loads((tmp_path / "search" / "history.json").read_text())
    assert history["trials"][0]["arch_str"] == "toy:w=8;d=2"  # the teacher is evaluated first
    assert result.metrics["trials"] == 4 and result.tags["space"] == "toy"
    assert all(c["objectives"]["latency_ms[onnxruntime-cpu]"] > 0 for c in pareto["candidates"])

    execute(
        "train",
        params,
        tmp_path / "train",
        tracking=False,
        dataset=digits_dir,
        search=tmp_path / "search",
        candidate=0,
    )
    meta = read_meta(tmp_path / "train")
    cand = pareto["candidates"][0]
    assert meta["space"] == "toy" and meta["toy"] == cand["toy"]
    model, _ = load_model(tmp_path / "train")
    assert model(torch.zeros(1, *INPUT)).shape == (1, CLASSES)
