"""Macro elastic supernet: subnet extraction, shared kernels, channel sorting, training on digits."""

from __future__ import annotations

import json
import random

import pytest
import torch

from nasforge.data.prepared import split_raw
from nasforge.data.sources import load_digits_raw
from nasforge.errors import ConfigError
from nasforge.space.cell import count_parameters
from nasforge.space.macro import (
    N_STAGES,
    MacroNetwork,
    MacroSpec,
    build_macro_network,
    macro_search_space,
)
from nasforge.supernet.macro_supernet import (
    DEFAULT_PHASES,
    DynamicBatchNorm2d,
    ElasticChoices,
    MacroSupernet,
    evaluate_subnet,
    recalibrate_bn,
    train_progressive,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these networks are tiny, and on a shared machine two spinning OpenMP
    threads made training ~8x slower in wall time than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_spec(rng: random.Random) -> MacroSpec:
    return MacroSpec.from_params({k: rng.choice(v) for k, v in macro_search_space().items()})


@torch.no_grad()
def _perturbed_supernet(seed: int = 0) -> MacroSupernet:
    """A supernet whose BN statistics, affine parameters and kernel matrices are all non-trivial,
    so a wrong slice anywhere changes the output."""
    torch.manual_seed(seed)
    net = MacroSupernet(1, 10)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    for name, p in net.named_parameters():
        if "kernel_transforms" in name:
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """Normalised digits splits (8x8, one channel)."""
    arrays = split_raw(load_digits_raw(), 0.15, 0.15, seed=0)
    x = {s: torch.from_numpy(arrays[f"x_{s}"].astype("float32") / 255.0) for s in ("train", "val")}
    mean, std = x["train"].mean(), x["train"].std()
    out = {f"x_{s}": (v - mean) / std for s, v in x.items()}
    out.update({f"y_{s}": torch.from_numpy(arrays[f"y_{s}"]) for s in ("train", "val")})
    return out


def test_get_active_subnet_computes_what_the_supernet_computes() -> None:
    net = _perturbed_supernet()
    rng = random.Random(0)
    specs = [MacroSpec.largest(), MacroSpec.smallest()] + [_random_spec(rng) for _ in range(4)]
    x = torch.randn(3, 1, 8, 8)
    outputs = []
    for spec in specs:
        net.set_active_subnet(spec)
        subnet = net.get_active_subnet()
        assert isinstance(subnet, MacroNetwork)
        assert subnet.spec == spec
        # Same architecture as the freshly built network of the spec.
        assert count_parameters(subnet) == count_parameters(build_macro_network(spec, 1, 10))
        subnet.eval()
        with torch.no_grad():
            ours, theirs = net(x), subnet(x)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        outputs.append(ours)
    # Different specs really are different functions (the slices are not all the same weights).
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)


def test_get_active_subnet_takes_a_spec_and_json_round_trip_preserves_it() -> None:
    net = _perturbed_supernet(1)
    spec = _random_spec(random.Random(5))
    again = MacroSpec.from_json(spec.to_json())
    assert again == spec
    x = torch.randn(2, 1, 8, 8)
    a, b = net.get_active_subnet(spec).eval(), net.get_active_subnet(again).eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    assert net.largest_spec() == MacroSpec.largest()
    assert net.smallest_spec() == MacroSpec.smallest()


def _with_kernel(k: int) -> MacroSpec:
    return MacroSpec((2,) * N_STAGES, (1.0,) * N_STAGES, (k,) * N_STAGES, (4,) * N_STAGES)


@torch.no_grad()
def test_small_kernels_are_centre_crops_of_the_7x7_kernel() -> None:
    net = _perturbed_supernet(2)
    x = torch.randn(2, 1, 8, 8)
    specs = {k: _with_kernel(k) for k in (3, 5, 7)}

    def outputs() -> dict[int, torch.Tensor]:
        return {k: net.get_active_subnet(s).eval()(x) for k, s in specs.items()}

    before = outputs()
    # The outer ring of the 7x7 kernel belongs to the 7x7 subnet only.
    dw = net.stages[0][0].depthwise[0].weight
    dw[:, :, 0, :] += 1.0
    after_ring = outputs()
    torch.testing.assert_close(after_ring[3], before[3])
    torch.testing.assert_close(after_ring[5], before[5])
    assert not torch.allclose(after_ring[7], before[7])
    # The centre is shared by every kernel size: changing it changes the 3x3 subnet too.
    dw[:, :, 3, 3] += 1.0
    after_centre = outputs()
    for k in (3, 5, 7):
        assert not torch.allclose(after_centre[k], after_ring[k]), k
    # Subnet extraction copies the transformed 3x3 kernel, not the raw crop.
    block = net.stages[0][0]
    hidden = block.expand[0].weight.shape[0]
    m53 = block.kernel_transforms["5to3"]
    m75 = block.kernel_transforms["7to5"]
    crop5 = (dw[:, :, 1:6, 1:6].reshape(hidden, 25) @ m75.T).reshape(hidden, 1, 5, 5)
    expected = (crop5[:, :, 1:4, 1:4].reshape(hidden, 9) @ m53.T).reshape(hidden, 1, 3, 3)
    torch.testing.assert_close(block.active_filter(hidden, 3), expected)


@torch.no_grad()
def test_channel_sorting_keeps_the_largest_network_and_orders_by_importance() -> None:
    net = _perturbed_supernet(3)
    x = torch.randn(4, 1, 8, 8)
    net.set_active_subnet(MacroSpec.largest())
    before = net(x)
    narrow = _random_spec(random.Random(3))
    net.set_active_subnet(narrow)
    narrow_before = net(x)
    net.sort_channels()
    net.set_active_subnet(MacroSpec.largest())
    torch.testing.assert_close(net(x), before, atol=1e-5, rtol=1e-5)
    # Sorting really reordered channels: the narrow subnet now keeps other channels.
    net.set_active_subnet(narrow)
    assert not torch.allclose(net(x), narrow_before, atol=1e-4)
    for blocks in net.stages:
        for block in blocks:
            hidden_l1 = block.project[0].weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(hidden_l1[:-1] >= hidden_l1[1:])
        out_l1 = sum(b.project[0].weight.abs().sum(dim=(1, 2, 3)) for b in blocks)
        assert torch.all(out_l1[:-1] >= out_l1[1:])


def test_dynamic_batchnorm_updates_only_the_active_channels() -> None:
    bn = DynamicBatchNorm2d(8).train()
    bn(torch.randn(16, 3, 4, 4) + 5.0)
    assert torch.all(bn.running_mean[:3] > 0.2)
    assert torch.all(bn.running_mean[3:] == 0)


def test_sample_active_subnet_stays_inside_the_choices() -> None:
    net = MacroSupernet(1, 10)
    phase = DEFAULT_PHASES[1]  # elastic kernel only
    rng = random.Random(0)
    kernels = set()
    for _ in range(20):
        spec = net.sample_active_subnet(rng, phase)
        assert net.active_spec == spec
        assert set(spec.depths) == {3} and set(spec.widths) == {1.0} and set(spec.expands) == {6}
        kernels |= set(spec.kernels)
    assert kernels == {3, 5, 7}


def test_bad_phase_and_epochs_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        ElasticChoices("bad", kernels=(4,))
    with pytest.raises(ConfigError):
        ElasticChoices("empty", depths=())
    with pytest.raises(ConfigError):
        train_progressive(
            MacroSupernet(1, 10),
            torch.zeros(4, 1, 8, 8),
            torch.zeros(4, dtype=torch.long),
            epochs_per_phase=[1, 1],
        )
    with pytest.raises(ConfigError):
        MacroSupernet(0, 10)
    with pytest.raises(ConfigError):
        MacroSupernet(1, 10).set_active_subnet("|nor_conv_3x3~0|")  # type: ignore[arg-type]


# A cheap corner of the space for the fast training test (7x7 kernels and expansion 6 make the
# full largest network ~30x slower on CPU; the full schedule runs in the slow test below).
_CHEAP_PHASES = (
    ElasticChoices("largest", depths=(2,), widths=(1.0,), kernels=(5,), expands=(3,)),
    ElasticChoices("kernel", depths=(2,), widths=(1.0,), kernels=(3, 5), expands=(3,)),
    ElasticChoices("depth", depths=(1, 2), widths=(1.0,), kernels=(3, 5), expands=(3,)),
    ElasticChoices("width", depths=(1, 2), widths=(0.5, 1.0), kernels=(3, 5), expands=(3,)),
)


def _check_trained(net: MacroSupernet, phases, digits) -> None:
    x_tr, x_val, y_val = digits["x_train"], digits["x_val"], digits["y_val"]
    largest, smallest = phases[-1].largest(), phases[-1].smallest()
    untrained = MacroSupernet(1, 10)
    for spec in (largest, smallest):
        acc, subnet = evaluate_subnet(net, spec, x_val, y_val, x_tr, bn_batches=4, batch_size=64)
        base, _ = evaluate_subnet(untrained, spec, x_val, y_val, x_tr, bn_batches=4)
        assert acc > 0.5, (spec, acc)  # chance is 0.1
        assert acc > base + 0.3, (spec, acc, base)
    # BN recalibration re-estimates the subnet's statistics from the training images.
    subnet = net.get_active_subnet(smallest)
    bn = subnet.blocks[0].expand[1]
    stats = bn.running_mean.clone()
    recalibrate_bn(subnet, [x_tr[:64], x_tr[64:128]])
    assert not torch.allclose(bn.running_mean, stats)
    # Cumulative average over two equal batches: the stem BN now holds the mean of its input.
    with torch.no_grad():
        mean = subnet.stem[0](x_tr[:128]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(subnet.stem[1].running_mean, mean, atol=1e-4, rtol=1e-4)


def test_progressive_sandwich_training_on_digits_beats_chance(digits) -> None:
    torch.manual_seed(0)
    net = MacroSupernet(1, 10)
    history = train_progressive(
        net,
        digits["x_train"][:512],
        digits["y_train"][:512],
        phases=_CHEAP_PHASES,
        epochs_per_phase=[3, 1, 1, 2],
        batch_size=64,
        lr=0.05,
        n_random=1,
    )
    assert list(history) == [p.name for p in _CHEAP_PHASES]
    assert history["largest"][-1] < history["largest"][0]
    _check_trained(net, _CHEAP_PHASES, digits)


class _Killed(Exception):
    """Stands in for SIGKILL: raised right after a checkpoint is written."""


def test_progressive_shrinking_resumes_in_the_phase_it_was_killed_in(digits, tmp_path) -> None:
    """Killed after the first epoch of the width phase (channels already sorted), a rerun replays
    the finished phases from their checkpoints and ends with the uninterrupted weights."""
    from nasforge.checkpoint import EpochCheckpoint

    x, y = digits["x_train"][:128], digits["y_train"][:128]
    kw = dict(phases=_CHEAP_PHASES, epochs_per_phase=[1, 1, 1, 2], batch_size=64, n_random=1)

    def trained(folder, die_in: str | None = None):
        def checkpoints(name: str) -> EpochCheckpoint:
            ck = EpochCheckpoint(folder / f"{name}.ckpt")
            if name == die_in:

                class Dying(EpochCheckpoint):
                    def save(self, epoch, *args, **kwargs):
                        super().save(epoch, *args, **kwargs)
                        raise _Killed

                return Dying(ck.path)
            return ck

        torch.manual_seed(0)
        net = MacroSupernet(1, 10)
        return net, train_progressive(net, x, y, checkpoints=checkpoints, **kw)

    ref, ref_history = trained(tmp_path / "ref")
    with pytest.raises(_Killed):
        trained(tmp_path / "cut", die_in="supernet-width")
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        f"supernet-{p.name}.ckpt" for p in sorted(_CHEAP_PHASES, key=lambda p: p.name)
    ]
    resumed, history = trained(tmp_path / "cut")
    assert history == ref_history
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_full_progressive_shrinking_on_digits(digits) -> None:
    torch.manual_seed(0)
    net = MacroSupernet(1, 10)
    train_progressive(
        net,
        digits["x_train"],
        digits["y_train"],
        phases=DEFAULT_PHASES,
        epochs_per_phase=[3, 1, 1, 2],
        batch_size=128,
        n_random=1,
    )
    _check_trained(net, DEFAULT_PHASES, digits)


# --------------------------------------------------------------------------------------------
# Search over the macro space through the supernet (nasforge.supernet.macro_search)


def _evaluator(digits, net: MacroSupernet | None = None):
    """Scores subnets of the whole macro space on validation error and parameters."""
    from nasforge.search.subnet_metrics import SubnetEvaluator
    from nasforge.space.registry import get_space

    torch.manual_seed(0)
    return SubnetEvaluator(
        get_space("macro")(1, 10, (8, 8)),
        net or MacroSupernet(1, 10),
        digits["x_train"][:64],
        digits["x_val"][:64],
        digits["y_val"][:64],
        bn_batches=1,
        batch_size=32,
    )


def test_macro_search_resumes_from_storage_without_reevaluating(digits, tmp_path) -> None:
    from nasforge.search.driver import search_subnets

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = _evaluator(digits)
    records = search_subnets(first, strategy="regevo", trials=4, seed=0, storage=storage)
    assert len(records) == 4
    assert MacroSpec.from_json(json.dumps(records[0]["spec"])) == MacroSpec.largest()
    # A second process picks the study up: only the missing trials are evaluated.
    again = _evaluator(digits, MacroSupernet(1, 10))
    records = search_subnets(again, strategy="regevo", trials=7, seed=0, storage=storage)
    assert len(records) == 7
    assert len({r["trial"] for r in records}) == 7
    assert len(again.cache) <= 3
    for r in records:
        spec = MacroSpec.from_json(json.dumps(r["spec"]))
        assert 0.0 <= r["objectives"]["val_error"] <= 1.0
        assert r["objectives"]["params"] == count_parameters(build_macro_network(spec, 1, 10))


@pytest.mark.parametrize("strategy", ["optuna-nsga2", "progressive"])
def test_macro_search_runs_the_shared_strategies(digits, strategy: str) -> None:
    from nasforge.search.driver import search_subnets, select_candidates

    ev = _evaluator(digits)
    records = search_subnets(ev, strategy=strategy, trials=5, seed=1)
    assert len(records) == 5
    names = ev.objective_names()
    assert names == ["val_error", "params"]
    chosen = select_candidates(records, names, k=2)
    assert 1 <= len(chosen) <= 2
    assert all(r["rank"] >= 0 for r in records)
    assert min(r["rank"] for r in chosen) == 0
    with pytest.raises(ConfigError):
        search_subnets(ev, strategy="no-such-strategy", trials=2, seed=0)


def test_split_epochs_gives_every_phase_one_and_the_first_the_rest() -> None:
    from nasforge.supernet.macro_search import split_epochs

    assert split_epochs(10, 4) == [4, 2, 2, 2]
    assert split_epochs(3, 4) == [1, 1, 1, 1]
    assert sum(split_epochs(30, 4)) == 30


def test_load_macro_supernet_round_trips_and_rejects_bad_files(tmp_path) -> None:
    from safetensors.torch import save_file

    from nasforge.errors import ModelFileError
    from nasforge.supernet.macro_search import load_macro_supernet

    net = _perturbed_supernet(4)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()},
        str(tmp_path / "supernet.safetensors"),
    )
    loaded = load_macro_supernet(tmp_path, 1, 10)
    spec = _random_spec(random.Random(4))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = net.get_active_subnet(spec).eval()(x)
        b = loaded.get_active_subnet(spec).eval()(x)
    torch.testing.assert_close(a, b)
    with pytest.raises(ModelFileError):
        load_macro_supernet(tmp_path, 3, 10)  # a 3-channel stem does not fit
    with pytest.raises(ModelFileError):
        load_macro_supernet(tmp_path / "missing", 1, 10)


@pytest.mark.slow
def test_macro_search_stage_writes_pareto(digits_dir, tmp_path) -> None:
    from nasforge.stages.search import run
    from tests.conftest import tiny_params

    # The whole macro space; latency measured on ONNX Runtime, batch 1, one thread.
    params = tiny_params(
        run={"threads": 1},
        space={"kind": "macro"},
        search={"supernet_epochs": 4, "trials": 5, "batch_size": 64, "latency_source": "measure"},
        targets=["onnxruntime-cpu"],
    )

    result = run(params, digits_dir, tmp_path / "search")
    pareto = json.loads((tmp_path / "search" / "pareto.json").read_text())
    assert pareto["space"] == "macro"
    assert pareto["objectives"] == ["val_error", "latency_ms[onnxruntime-cpu]", "memory_mb"]
    assert all(r["metrics"]["memory_mb"] > r["metrics"]["size_mb"] > 0 for r in pareto["front"])
    assert all(r["objectives"]["latency_ms[onnxruntime-cpu]"] > 0 for r in pareto["front"])
    assert 1 <= len(pareto["candidates"]) <= params.search.max_candidates
    for cand in pareto["candidates"]:
        MacroSpec.from_json(json.dumps(cand["spec"]))
    assert result.metrics["trials"] == 5
    assert result.metrics["best_val_accuracy"] > 0.2
    assert (tmp_path / "search" / "supernet.safetensors").is_file()
