"""Latency tables, the predictor, the memory model and energy labelling (real runtimes)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from nasforge.bench.timing_export import export_for_timing
from nasforge.errors import ModelFileError, TargetError
from nasforge.hardware.energy import estimate_energy, meter_for, model_energy, table_energy
from nasforge.hardware.latency_table import LatencyTable
from nasforge.hardware.memory import memory_report, peak_activation_bytes
from nasforge.hardware.predictor import LatencyPredictor, get_latency_table, predict_latency_ms
from nasforge.hardware.profiling import build_latency_table
from nasforge.hardware.spaces import CellBlockSpace, computed_edges, get_space
from nasforge.hardware.targets import get_target, shared_data_dir
from nasforge.space.cell import CellNetworkShape
from nasforge.space.nb201 import CellSpec

# A tiny network keeps profiling to seconds.
SHAPE = CellNetworkShape(in_channels=1, num_classes=4, channels=4, cells_per_stage=1, stages=2)
ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
FAST = dict(
    warmup=1, repeats=3, rounds=1, calibration_networks=3, calibration_exporter="torchscript"
)


@pytest.fixture(scope="module")
def space() -> CellBlockSpace:
    return CellBlockSpace(SHAPE, (6, 6))


@pytest.fixture(scope="module")
def ort_table(space: CellBlockSpace) -> LatencyTable:
    return build_latency_table("onnxruntime-cpu", space, batch_sizes=(1, 2), threads=1, **FAST)


def _op_counts(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("seed", range(10))
def test_block_counts_match_exported_graph(space: CellBlockSpace, tmp_path: Path, seed: int):
    import random

    spec = space.sample(random.Random(seed))
    path = export_for_timing(space.build(spec), space.input_shape(), tmp_path / "n.onnx")
    ops = _op_counts(path)
    counts = space.block_counts(spec)
    convs = sum(n for k, n in counts.items() if k.startswith("op:nor_conv"))
    pools = sum(n for k, n in counts.items() if k.startswith("op:avg_pool"))
    adds = sum(n for k, n in counts.items() if k.startswith("add:"))
    # stem conv + per reduction: 2 convs, 1 shortcut conv, 1 pool, 1 add
    n_red = SHAPE.stages - 1
    assert ops["Conv"] == convs + 1 + 3 * n_red
    assert ops["AveragePool"] == pools + n_red
    assert ops["Add"] == adds + n_red
    # ReLUs: one per source node feeding convs (merged), 2 per reduction, 1 in the head
    relus = sum(n for k, n in counts.items() if k.startswith("relu:"))
    assert ops["Relu"] == relus + 2 * n_red + 1


def _openvino_runtime_convs(path: Path, input_shape: tuple[int, ...]) -> int:
    """Convolutions OpenVINO's compiled CPU graph really runs (after its constant folding)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([2, *input_shape])
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    types = [
        op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()
    ]
    return types.count("Convolution")


# Zero nodes (fed by `none` edges only) are read by convs in the first two; the third is a
# disconnected cell; the rest are random.
ZERO_NODE_ARCHS = [
    "|none~0|+|none~0|none~1|+|none~0|nor_conv_3x3~1|nor_conv_3x3~2|",
    "|none~0|+|nor_conv_3x3~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|avg_pool_3x3~2|",
    "|none~0|+|skip_connect~0|none~1|+|none~0|nor_conv_1x1~1|none~2|",
]


@pytest.mark.parametrize("case", range(8))
def test_openvino_runs_every_counted_conv(space: CellBlockSpace, tmp_path: Path, case: int):
    # A node fed only by `none` edges is `x * 0` (Cell.forward), which depends on the input:
    # OpenVINO folds neither it nor the convs reading it, so its tables count them like ONNX
    # Runtime's (folds_constants changes nothing in the cell space).
    import random

    spec = (
        CellSpec.from_arch_str(ZERO_NODE_ARCHS[case])
        if case < len(ZERO_NODE_ARCHS)
        else space.sample(random.Random(case))
    )
    path = export_for_timing(space.build(spec), space.input_shape(), tmp_path / "n.onnx")
    folded, plain = space.block_counts(spec, True), space.block_counts(spec, False)
    assert folded == plain
    convs = sum(n for k, n in plain.items() if k.startswith("op:nor_conv"))
    assert _openvino_runtime_convs(path, space.input_shape()) == convs + 1 + 3 * (SHAPE.stages - 1)


@pytest.mark.parametrize("cells_per_stage", [1, 2])
def test_int8_float_output_convs_match_what_onnxruntime_runs(tmp_path: Path, cells_per_stage: int):
    # The rule of nasforge.hardware.cell_int8_layout against the INT8 graph ONNX Runtime
    # optimizes (a Conv left unfused, not a QLinearConv), on random cells of the space.
    import random

    import onnxruntime as ort

    from nasforge.bench.timing_export import quantize_for_timing
    from nasforge.hardware.cell_int8_layout import float_output_convs

    shape = CellNetworkShape(1, 4, channels=4, cells_per_stage=cells_per_stage, stages=3)
    sp = CellBlockSpace(shape, (8, 8))
    rng = random.Random(cells_per_stage)
    seen_float = 0
    for i in range(12):
        spec = sp.sample(rng)
        fp32 = export_for_timing(sp.build(spec), sp.input_shape(), tmp_path / f"{i}.onnx")
        int8 = quantize_for_timing(fp32, tmp_path / f"{i}.int8.onnx", sp.input_shape())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.optimized_model_filepath = str(tmp_path / f"{i}.opt.onnx")
        ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
        nodes = onnx.load(str(tmp_path / f"{i}.opt.onnx")).graph.node
        ran = collections.Counter(
            op
            for n in nodes
            if n.op_type == "Conv"
            for op in ("nor_conv_1x1", "nor_conv_3x3")
            if op in n.name
        )
        want = collections.Counter()
        for (op, _stage), n in float_output_convs(spec, 3, cells_per_stage).items():
            want[op] += n
        assert ran == want, spec.arch_str
        counts = sp.block_counts(spec, precision="int8")
        assert sum(n for k, n in counts.items() if k.startswith("fpconv:")) == sum(want.values())
        seen_float += sum(want.values())
    # the sample exercises the rule (random cells have float convs about one time in four)
    assert seen_float > 0


def test_int8_cell_tables_price_float_convs_from_their_conv(space: CellBlockSpace):
    derived = space.derived_blocks("int8")
    assert derived and not space.derived_blocks("fp32")
    profiled = {blk.key for blk in space.blocks()}
    assert set(derived.values()) <= profiled and not set(derived) & profiled


def test_computed_edges_drops_unused():
    # node 1 feeds only a 'none' edge to node 3 and nothing else: its conv is dead code.
    spec = CellSpec(("nor_conv_3x3", "skip_connect", "none", "skip_connect", "none", "none"))
    assert computed_edges(spec) == [False, False, False, True, False, False]


def test_table_roundtrip_and_prediction(
    ort_table: LatencyTable, space: CellBlockSpace, tmp_path: Path
):
    assert ort_table.batch_sizes == [1, 2]
    assert all(v >= 0 for v in ort_table.blocks[1].values())
    assert {k for k in ort_table.blocks[1]} >= set(space.block_counts(CellSpec.from_arch_str(ARCH)))
    m = ort_table.machine
    assert m["threads"] == 1 and m["runtime"] == "onnxruntime" and m["cpu_model"]
    assert m["runtime_version"] and isinstance(m["isa_flags"], list)
    path = ort_table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded.to_dict() == json.loads(path.read_text())
    spec = CellSpec.from_arch_str(ARCH)
    counts = space.block_counts(spec)
    assert loaded.predict_counts(counts, 1) == pytest.approx(ort_table.predict_counts(counts, 1))
    assert loaded.predict_counts(counts, 1) > 0
    with pytest.raises(TargetError, match="batch sizes"):
        loaded.predict_counts(counts, 64)
    loaded.check_machine()


def test_table_from_other_machine_is_refused(ort_table: LatencyTable):
    d = ort_table.to_dict()
    d["machine"] = {**d["machine"], "cpu_model": "Some Other CPU"}
    with pytest.raises(TargetError, match="cpu_model"):
        LatencyTable.from_dict(d).check_machine()


def test_bad_table_files(tmp_path: Path):
    with pytest.raises(ModelFileError, match="not found"):
        LatencyTable.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        LatencyTable.load(bad)
    bad.write_text(json.dumps({"schema": "other/9"}))
    with pytest.raises(ModelFileError, match="schema"):
        LatencyTable.load(bad)


def test_openvino_table(space: CellBlockSpace):
    table = build_latency_table("openvino-cpu", space, batch_sizes=(1,), threads=1, **FAST)
    assert table.folds_constants  # the target folds constants; cell networks have none
    assert table.predict_counts(space.block_counts(CellSpec.from_arch_str(ARCH), True), 1) > 0


def test_int8_table_carries_its_derived_blocks(space: CellBlockSpace):
    table = build_latency_table(
        "onnxruntime-cpu", space, batch_sizes=(1,), threads=1, precision="int8", **FAST
    )
    for key, source in space.derived_blocks("int8").items():
        assert table.blocks[1][key] == table.blocks[1][source]
        assert table.block_stats[key] == table.block_stats[source]
    spec = CellSpec.from_arch_str(
        "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|nor_conv_1x1~2|"
    )
    counts = space.block_counts(spec, precision="int8")
    assert any(k.startswith("fpconv:") for k in counts)
    assert table.predict_counts(counts, 1) > 0


def test_predictor_cache_modes_and_table_target(space: CellBlockSpace, tmp_path: Path):
    spec = CellSpec.from_arch_str(ARCH)
    pred = LatencyPredictor(["onnxruntime-cpu"], space, threads=1, table_dir=tmp_path, **FAST)
    first = pred.predict(spec)["onnxruntime-cpu"]
    assert first > 0
    cached = list(tmp_path.glob("onnxruntime-cpu__cell__*.json"))
    assert len(cached) == 1
    # second use loads the cache: same numbers, no rebuild
    again = get_latency_table("onnxruntime-cpu", space, (1,), 1, tmp_path, build=False)
    assert again.predict_counts(space.block_counts(spec), 1) == pytest.approx(first)
    assert pred.describe()["onnxruntime-cpu"]["source"] == "profiled-table"
    measured = predict_latency_ms("onnxruntime-cpu", spec, space=space, threads=1, mode="measure")
    assert measured > 0
    with pytest.raises(TargetError, match="nasforge profile"):
        get_latency_table("openvino-cpu", space, (1,), 1, tmp_path, build=False)


@pytest.mark.skipif(
    not (shared_data_dir() / "nb201" / "nb201_dev.csv").is_file(), reason="shared NB201 CSV missing"
)
def test_table_target_through_predictor(space: CellBlockSpace):
    pred = LatencyPredictor(["table:raspi4_latency_ms"], space)
    spec = CellSpec.from_arch_str(ARCH)
    assert pred.predict(spec) == {
        "table:raspi4_latency_ms": get_target("table:raspi4_latency_ms").lookup(ARCH)
    }
    e = table_energy(get_target("table:pi5_onnx_latency_ms"), ARCH)
    assert e is not None and e.source == "measured" and e.mj_per_batch > 0
    assert table_energy(get_target("table:raspi4_latency_ms"), ARCH) is None


def test_unknown_space():
    from nasforge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown search space 'mobile'"):
        get_space("mobile")


def test_memory_model(space: CellBlockSpace, tmp_path: Path):
    spec = CellSpec.from_arch_str(ARCH)
    net = space.build(spec)
    path = export_for_timing(net, space.input_shape(), tmp_path / "m.onnx")
    rep = memory_report(path, batch_size=8)
    n_params = sum(p.numel() for p in net.parameters())
    # The exporter folds eval-mode BatchNorm into the convs: a few per-channel values vanish.
    assert 0.8 * n_params <= rep.param_count <= n_params + sum(b.numel() for b in net.buffers())
    assert rep.param_bytes["fp32"] == 4 * rep.param_count
    assert rep.param_bytes["fp16"] == 2 * rep.param_count
    assert rep.param_count <= rep.param_bytes["int8"] < rep.param_bytes["fp16"]
    # Activations scale with batch; the input alone is a lower bound.
    a1, a8 = peak_activation_bytes(path, 1), rep.peak_activation_bytes
    assert a8 >= 4 * 8 * 1 * 6 * 6
    assert 7 * a1 <= a8 <= 8 * a1 + 1024


def test_param_count_exact_without_bn(tmp_path: Path):
    import torch

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    )
    path = export_for_timing(net, (1, 6, 6), tmp_path / "p.onnx")
    rep = memory_report(path)
    assert rep.param_count == (4 * 9 + 4) + (64 * 3 + 3)
    assert rep.param_bytes["fp32"] == 4 * rep.param_count


def test_memory_model_exact_on_chain(tmp_path: Path):
    import torch

    # x -> relu -> relu: peak is two live tensors of the same size (input freed after use? no:
    # the input is consumed by the first relu, so at most 2 tensors are alive at once).
    net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.ReLU())
    path = export_for_timing(net, (3, 4, 4), tmp_path / "c.onnx")
    assert peak_activation_bytes(path, 2) == 2 * (2 * 3 * 4 * 4 * 4)


def test_energy_is_labelled(space: CellBlockSpace, tmp_path: Path):
    e = estimate_energy(2.0, 4, "cpu", 2)
    assert e.source == "estimated" and "W/core" in e.method
    assert (
        e.mj_per_batch == pytest.approx(2.0 * e.power_w) and e.mj_per_sample == e.mj_per_batch / 4
    )
    path = export_for_timing(
        space.build(CellSpec.from_arch_str(ARCH)), space.input_shape(), tmp_path / "e.onnx"
    )
    r = model_energy(path, "onnxruntime-cpu", batch_size=2, threads=1, seconds=0.05)
    assert r.source == ("measured" if meter_for("cpu") else "estimated")
    assert r.mj_per_batch > 0 and np.isfinite(r.mj_per_sample)


def test_energy_per_inference_labels():
    from nasforge.hardware.energy import energy_per_inference

    d = energy_per_inference("onnxruntime-cpu", 2.0, threads=2)
    assert d["source"] in ("measured", "estimated") and d["mj"] > 0
    assert d["source"] == "estimated"  # no model given: nothing to run under a meter
    t = energy_per_inference("table:raspi4_latency_ms", 50.0)
    assert t["source"] == "estimated" and t["mj"] == pytest.approx(6.4 * 50.0)
    if (shared_data_dir() / "nb201" / "nb201_dev.csv").is_file():
        m = energy_per_inference("table:pi5_onnx_latency_ms", 10.0, arch_str=ARCH)
        assert m["source"] == "measured" and m["method"] == "table:pi5_onnx_energy_mj"


# ------------------------------------------------------------------------------ macro space

# A sub-space keeps the macro table to a dozen blocks (the full space has 373).
SMALL_MACRO = dict(depths=(1, 2), widths=(0.5,), kernels=(3,), expands=(3,))


@pytest.fixture(scope="module")
def macro_space():
    from nasforge.hardware.spaces import MacroBlockSpace

    return MacroBlockSpace(in_channels=1, num_classes=4, resolution=(8, 8), **SMALL_MACRO)


def test_full_macro_space_blocks_cover_random_networks(tmp_path: Path):
    import random

    import torch

    from nasforge.hardware.spaces import MacroBlockSpace

    space = get_space("macro", shape=CellNetworkShape(3, 10, 16, 1), resolution=(32, 32))
    assert isinstance(space, MacroBlockSpace) and space.input_shape() == (3, 32, 32)
    blocks = {b.key: b for b in space.blocks()}
    assert len(blocks) == 373  # stem + 45 + 3 * 108 inverted residuals + 3 heads
    for seed in range(30):
        spec = space.sample(random.Random(seed))
        counts = space.block_counts(spec)
        assert set(counts) <= set(blocks)
        irs = sum(n for k, n in counts.items() if k.startswith(("ir:", "ir-res:")))
        assert irs == sum(spec.depths) and sum(counts.values()) == irs + 2  # + stem, head
    # Every block builds, takes its declared input, and chainable blocks keep their shape.
    for key in list(blocks)[::17]:
        blk = blocks[key]
        y = blk.module().eval()(torch.randn(2, *blk.input_shape))
        assert (tuple(y.shape[1:]) == blk.input_shape) == blk.chainable or key.startswith("head")
    # The blocks of one network, chained, are the network's layers: same op counts.
    spec = space.sample(random.Random(7))
    path = export_for_timing(space.build(spec), space.input_shape(), tmp_path / "m.onnx")
    ops = _op_counts(path)
    assert ops["Conv"] == 1 + 3 * sum(spec.depths) + 1
    assert ops["Gemm"] + ops["MatMul"] == 1


def test_macro_space_restriction_and_errors(macro_space):
    from nasforge.errors import ConfigError
    from nasforge.hardware.spaces import MacroBlockSpace
    from nasforge.space.macro import MacroSpec

    keys = [b.key for b in macro_space.blocks()]
    assert len(keys) == len(set(keys)) == 1 + 8 + 1  # stem, 4 stage-first + 4 residual, head
    assert macro_space.config()["kernels"] == [3]
    with pytest.raises(ConfigError, match="kernels"):
        MacroBlockSpace(kernels=(4,))
    with pytest.raises(ConfigError, match="MacroSpec"):
        macro_space.block_counts(CellSpec.from_arch_str(ARCH))
    with pytest.raises(ConfigError, match="CellSpec"):
        CellBlockSpace(SHAPE, (6, 6)).block_counts(MacroSpec.smallest())


def test_macro_table_roundtrip_and_prediction(macro_space, tmp_path: Path):
    import random

    table = build_latency_table("onnxruntime-cpu", macro_space, batch_sizes=(1,), threads=1, **FAST)
    assert table.space == "macro" and set(table.blocks[1]) == {b.key for b in macro_space.blocks()}
    path = table.save(tmp_path / "macro.json")
    loaded = LatencyTable.load(path)
    assert loaded.to_dict() == json.loads(path.read_text())
    spec = macro_space.sample(random.Random(3))
    counts = macro_space.block_counts(spec)
    assert loaded.predict_counts(counts, 1) == pytest.approx(table.predict_counts(counts, 1))
    assert loaded.predict_counts(counts, 1) > 0
    cal = loaded.calibration[1]
    assert cal.n_networks == 3 and cal.features and len(cal.coefs) == len(cal.features)
    assert all(c >= 0 for c in cal.coefs)


def test_predictor_uses_calibration_regression(ort_table: LatencyTable, space: CellBlockSpace):
    from nasforge.hardware.calibration import Calibration

    counts = space.block_counts(CellSpec.from_arch_str(ARCH))
    block_sum = ort_table.block_sum_ms(counts, 1)
    n_blocks = sum(counts.values())
    d = ort_table.to_dict()
    d["calibration"]["1"] = vars(
        Calibration(features=["block_sum", "n_blocks", "const"], coefs=[2.0, 0.5, 3.0])
    )
    table = LatencyTable.from_dict(d)
    assert table.predict_counts(counts, 1) == pytest.approx(2.0 * block_sum + 0.5 * n_blocks + 3)
    # Old tables without features: scale * block sum + overhead.
    d["calibration"]["1"] = {"scale": 1.5, "overhead_ms": 0.25, "n_networks": 0}
    table = LatencyTable.from_dict(d)
    assert table.predict_counts(counts, 1) == pytest.approx(1.5 * block_sum + 0.25)


def test_fit_calibration_recovers_overhead_and_picks_features():
    from nasforge.hardware.calibration import fit_calibration

    rng = np.random.default_rng(0)
    x = rng.uniform(1, 10, 20)
    k = rng.integers(3, 30, 20)
    # Network i: one block "n<i>" of latency x[i] and k[i] free blocks: block sum x, k+1 blocks.
    latencies = {**{f"n{i}": float(v) for i, v in enumerate(x)}, "free": 0.0}
    counts = [{f"n{i}": 1, "free": int(k[i])} for i in range(20)]
    n = k + 1.0
    # Pure scale + overhead: the simple regression is kept, and recovered.
    cal = fit_calibration(counts, latencies, 1.3 * x + 0.4)
    assert cal.features == ["block_sum", "const"]
    assert cal.scale == pytest.approx(1.3, rel=1e-6) and cal.overhead_ms == pytest.approx(0.4)
    assert cal.loo_within_10pct == 1.0 and cal.n_networks == 20
    # A per-block cost the block sum does not explain: #blocks enters the regression.
    cal = fit_calibration(counts, latencies, 1.1 * x + 0.2 * n + 0.1)
    assert cal.features == ["block_sum", "n_blocks", "const"]
    assert cal.coefs == pytest.approx([1.1, 0.2, 0.1], rel=1e-5, abs=1e-6)
    # Blocks of two kinds at different scales: the grouped regression wins when offered.
    half = {f"n{i}" for i in range(0, 20, 2)}
    y = np.array([(2.0 if f"n{i}" in half else 1.0) * x[i] + 0.3 for i in range(20)])
    lat2 = {**{(f"a{i}" if f"n{i}" in half else f"b{i}"): float(x[i]) for i in range(20)}}
    counts2 = [{(f"a{i}" if f"n{i}" in half else f"b{i}"): 1} for i in range(20)]
    sets = [("block_sum", "const"), ("sum[a]", "sum[b]", "const")]
    cal = fit_calibration(counts2, lat2, y, sets)
    assert cal.features == ["sum[a]", "sum[b]", "const"]
    assert cal.coefs == pytest.approx([2.0, 1.0, 0.3], rel=1e-5)
    # A burst of load on one calibration network: dropped as an outlier.
    y = 1.3 * x + 0.4
    y[3] *= 3
    cal = fit_calibration(counts, latencies, y)
    assert cal.n_outliers == 1 and cal.scale == pytest.approx(1.3, rel=1e-6)


def test_in_context_regression_corrects_blocks_the_profile_gets_wrong():
    from nasforge.hardware.calibration import Calibration, fit_calibration

    rng = np.random.default_rng(1)
    keys = [f"b{i}" for i in range(30)]
    table = {k: float(v) for k, v in zip(keys, rng.uniform(0.1, 1.0, 30), strict=True)}
    # Inside a network every block costs a different multiple of its profiled latency (fusion,
    # layout changes): no single scale on the block sum explains the networks.
    true = {k: table[k] * float(r) for k, r in zip(keys, rng.uniform(0.3, 2.0, 30), strict=True)}

    def network() -> dict[str, int]:
        return {str(k): int(rng.integers(1, 4)) for k in rng.choice(keys, 8, replace=False)}

    def latency(c: dict[str, int]) -> float:
        return sum(n * true[k] for k, n in c.items()) + 0.2

    calib = [network() for _ in range(60)]
    sets = [("block_sum", "const"), ("in_context", "const")]
    cal = fit_calibration(calib, table, [latency(c) for c in calib], sets)
    assert cal.features == ["in_context", "const"] and cal.prior_weight is not None
    assert cal.loo_within_10pct == 1.0
    held_out = [network() for _ in range(20)]
    for c in held_out:
        assert cal.apply(c, table) == pytest.approx(latency(c), rel=0.03)
    # A block no calibration network contained falls back to the scaled profile.
    unseen = {"new": 1}
    assert cal.apply(unseen, {**table, "new": 2.0}) == pytest.approx(
        cal.scale * 2.0 + cal.overhead_ms
    )
    # The fitted blocks survive a JSON round trip of the table's calibration.
    again = Calibration(**json.loads(json.dumps(vars(cal))))
    assert again.apply(held_out[0], table) == pytest.approx(cal.apply(held_out[0], table))
    # Too few networks to judge block by block: the simple regression is kept.
    few = calib[:6]
    assert fit_calibration(few, table, [latency(c) for c in few], sets).features == [
        "block_sum",
        "const",
    ]


def test_time_interleaved_budget_quantile_and_samples(space: CellBlockSpace, tmp_path: Path):
    from nasforge.bench.harness import open_session
    from nasforge.hardware.profiling import time_interleaved

    path = export_for_timing(
        space.build(CellSpec.from_arch_str(ARCH)), space.input_shape(), tmp_path / "t.onnx"
    )
    sessions = {"a": open_session(path, "onnxruntime-cpu", 1, space.input_shape(), 1)}
    runs: dict[str, list[float]] = {}
    best = time_interleaved(sessions, 1, 5, 2, samples=runs)
    assert len(runs["a"]) == 10 and min(runs["a"]) <= best["a"] <= max(runs["a"])
    # A tiny time budget per round: only min_repeats runs per round.
    runs = {}
    low = time_interleaved(
        sessions, 1, 5, 3, budget_ms=1e-6, min_repeats=2, quantile=0.0, samples=runs
    )
    assert len(runs["a"]) == 6 and low["a"] == pytest.approx(min(runs["a"]))


# ------------------------------------------------------------------------------ INT8 latency


def _ort_optimized_ops(path: Path, tmp_path: Path) -> collections.Counter:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _op_counts(tmp_path / "opt.onnx")


def test_int8_timing_export_has_the_deployed_qdq_layout(space: CellBlockSpace, tmp_path: Path):
    from nasforge.bench.timing_export import quantize_for_timing

    net = space.build(CellSpec.from_arch_str(ARCH))
    fp32 = export_for_timing(net, space.input_shape(), tmp_path / "f.onnx")
    int8 = quantize_for_timing(fp32, tmp_path / "q.onnx", space.input_shape())
    model = onnx.load(str(int8))
    ops = _op_counts(int8)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"] and "Identity" not in ops
    assert ops["Conv"] == _op_counts(fp32)["Conv"]
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n.op_type)
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        # every conv reads a quantized activation and per-channel int8 weights
        assert producer[conv.input[0]].op_type == "DequantizeLinear"
        wq = producer[conv.input[1]]
        assert (
            wq.op_type == "DequantizeLinear"
            and inits[wq.input[0]].data_type == onnx.TensorProto.INT8
        )
        assert len(onnx.numpy_helper.to_array(inits[wq.input[1]])) == inits[wq.input[0]].dims[0]
    # As deployed (torchao x86 quantizer): the stem's output (read by a pool, a ReLU and a sum)
    # stays float, and no quantized pool or sum is left for ONNX Runtime to form.
    stem = convs[0]
    assert "QuantizeLinear" not in consumers[stem.output[0]]
    opt = _ort_optimized_ops(int8, tmp_path)
    assert opt["QLinearConv"] >= 1
    assert not opt["QLinearAveragePool"] and not opt["QLinearAdd"]
    assert not any(n.startswith("QLinear") for n in _ort_optimized_ops(fp32, tmp_path))


@pytest.mark.parametrize("runtime", ["onnxruntime-cpu", "openvino-cpu"])
@pytest.mark.parametrize("which", ["cell", "macro"])
def test_int8_measure_mode(space, macro_space, runtime: str, which: str):
    import random

    from nasforge.hardware.predictor import measure_module

    sp = space if which == "cell" else macro_space
    spec = CellSpec.from_arch_str(ARCH) if which == "cell" else sp.sample(random.Random(1))
    pred = LatencyPredictor([runtime], sp, mode="measure", threads=1, precision="int8")
    ms = pred.predict(spec)[runtime]
    assert ms > 0 and np.isfinite(ms)
    d = pred.describe()[runtime]
    assert d["source"] == "measured" and d["precision"] == "int8"
    res = measure_module(sp.build(spec), runtime, sp.input_shape(), threads=1, repeats=3,
                         precision="int8")  # fmt: skip
    assert res.precision == "int8" and res.p50_ms > 0
    assert "8" in res.executed_precision  # int8+fp32 (ORT) / f32+u8 (OpenVINO)
    fp32 = measure_module(sp.build(spec), runtime, sp.input_shape(), threads=1, repeats=3)
    assert fp32.precision == "fp32"


def test_int8_table_build_predict_and_cache_separation(space: CellBlockSpace, tmp_path: Path):
    from nasforge.hardware.predictor import table_path

    spec = CellSpec.from_arch_str(ARCH)
    msgs: list[str] = []
    int8 = LatencyPredictor(["onnxruntime-cpu"], space, threads=1, table_dir=tmp_path,
                            precision="int8", progress=msgs.append, **FAST)  # fmt: skip
    assert int8.predict(spec)["onnxruntime-cpu"] > 0
    assert any("int8 block models" in m for m in msgs)
    d = int8.describe()["onnxruntime-cpu"]
    assert d["source"] == "profiled-table" and d["precision"] == "int8"
    assert [p.name.split("__")[2] for p in tmp_path.glob("*.json")] == ["int8"]
    fp32 = LatencyPredictor(["onnxruntime-cpu"], space, threads=1, table_dir=tmp_path, **FAST)
    assert fp32.describe()["onnxruntime-cpu"]["precision"] == "fp32"
    assert sorted(p.name.split("__")[2] for p in tmp_path.glob("*.json")) == ["fp32", "int8"]
    t8 = get_latency_table("onnxruntime-cpu", space, (1,), 1, tmp_path, build=False,
                           precision="int8")  # fmt: skip
    t32 = get_latency_table("onnxruntime-cpu", space, (1,), 1, tmp_path, build=False)
    assert t8.precision == t8.machine["precision"] == "int8" and t32.precision == "fp32"
    assert t8.settings["quantization"]["format"] == "QDQ"
    assert t8.calibration[1].n_networks == FAST["calibration_networks"]
    t8.check_machine(1)  # a saved INT8 table is this machine's INT8 table, not a foreign one
    assert LatencyTable.load(next(tmp_path.glob("*__int8__*.json"))).precision == "int8"
    # The precision is in the key and the file name; an INT8 target is INT8 regardless.
    ort, ort8 = get_target("onnxruntime-cpu"), get_target("onnxruntime-cpu-int8")
    paths = {table_path(ort, space, 1, tmp_path, p) for p in ("fp32", "int8")}
    assert len(paths) == 2
    assert "__int8__" in table_path(ort8, space, 1, tmp_path).name
    with pytest.raises(TargetError, match="precision"):
        LatencyPredictor(["onnxruntime-cpu"], space, precision="int4")


def _synthetic_gpu_table(ort_table: LatencyTable, target: str, tmp_path: Path) -> Path:
    d = ort_table.to_dict()
    d["target"] = target
    d["machine"] = {**d["machine"], "target": target, "cpu_model": "GPU node CPU",
                    "gpu_model": "NVIDIA H200", "runtime_version": "1.99-gpu"}  # fmt: skip
    path = tmp_path / f"{target}__cell__fp32__0123456789ab.json"
    return LatencyTable.from_dict(d).save(path)


@pytest.mark.parametrize("target", ["tensorrt-gpu", "onnxruntime-cuda"])
def test_gpu_target_without_table_is_one_line_error(
    space: CellBlockSpace, tmp_path: Path, target: str
):
    if get_target(target).is_available():  # pragma: no cover - only on a GPU machine
        pytest.skip(f"{target} runs here")
    with pytest.raises(TargetError) as err:
        LatencyPredictor([target], space, threads=1, table_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"'{target}'" in msg
    assert f"nasforge profile --target {target}" in msg and "table:" in msg
    with pytest.raises(TargetError, match=f"'{target}' cannot be measured here"):
        LatencyPredictor([target], space, mode="measure", threads=1)


def test_gpu_target_with_table_predicts_without_the_runtime(
    ort_table: LatencyTable, space: CellBlockSpace, tmp_path: Path, monkeypatch
):
    import nasforge.bench.harness as harness
    import nasforge.hardware.profiling as lt
    import nasforge.hardware.table_cache as cache

    if get_target("tensorrt-gpu").is_available():  # pragma: no cover - only on a GPU machine
        pytest.skip("tensorrt-gpu runs here")
    _synthetic_gpu_table(ort_table, "tensorrt-gpu", tmp_path)

    def no_runtime(*_a, **_k):
        raise AssertionError("the GPU runtime must not be started")

    monkeypatch.setattr(harness, "open_session", no_runtime)
    monkeypatch.setattr(lt, "open_session", no_runtime)
    monkeypatch.setattr(lt, "build_latency_table", no_runtime)
    monkeypatch.setattr(cache, "build_latency_table", no_runtime)
    pred = LatencyPredictor(["tensorrt-gpu"], space, threads=1, table_dir=tmp_path)
    spec = CellSpec.from_arch_str(ARCH)
    counts = space.block_counts(spec, ort_table.folds_constants)
    assert pred.predict(spec)["tensorrt-gpu"] == pytest.approx(ort_table.predict_counts(counts, 1))
    d = pred.describe()["tensorrt-gpu"]
    assert d["source"] == "profiled-table" and d["profiled_elsewhere"]["gpu_model"] == "NVIDIA H200"
    # An INT8 prediction needs an INT8 table: the FP32 one is not used for it.
    with pytest.raises(TargetError, match="no int8 latency table"):
        LatencyPredictor(["tensorrt-gpu"], space, threads=1, table_dir=tmp_path, precision="int8")


def _qdq_layout(path: Path) -> collections.Counter:
    """Per compute node: op type, which inputs are read through DequantizeLinear, and whether
    its output is quantized (the head's pooling/flatten spelling differs between exporters)."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n.op_type)
    skip = {"QuantizeLinear", "DequantizeLinear", "Identity", "Constant"}
    head = {"GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Gemm"}
    out: collections.Counter = collections.Counter()
    for n in g.node:
        if n.op_type in skip | head:
            continue
        data = n.input[:1] if n.op_type in ("Conv", "BatchNormalization", "Clip") else n.input
        dq = tuple(getattr(producer.get(i), "op_type", "") == "DequantizeLinear" for i in data)
        out[(n.op_type, tuple(sorted(dq)), "QuantizeLinear" in consumers[n.output[0]])] += 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["cell", "macro"])
def test_int8_timing_layout_matches_the_deployed_qat_export(
    space, macro_space, tmp_path: Path, which: str
):
    import random

    import torch

    from nasforge.compress.qat import quantize_qat
    from nasforge.export.onnx import export_int8

    sp = space if which == "cell" else macro_space
    spec = CellSpec.from_arch_str(ARCH) if which == "cell" else sp.sample(random.Random(1))
    net = sp.build(spec).eval()
    x = torch.randn(8, *sp.input_shape())
    qat = quantize_qat(net, x, lambda gm: gm(x), reduce_range=False)
    deployed = export_int8(qat.model, x, tmp_path / "deployed.onnx")
    timing = export_for_timing(net, sp.input_shape(), tmp_path / "t.onnx", precision="int8")
    assert _qdq_layout(timing) == _qdq_layout(deployed)
