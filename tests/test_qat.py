"""INT8 QAT/PTQ with torchao pt2e on a tiny cell-structured CNN and sklearn digits."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nasforge.compress import qat
from nasforge.errors import ModelFileError
from tests.compress_helpers import accuracy, digits, qat_bundle, trained_tiny


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return p


def test_scheme_full_range_with_vnni(tmp_path: Path) -> None:
    s = qat.detect_quant_scheme("qat", cpuinfo=_cpuinfo(tmp_path, "avx512f avx512_vnni"))
    assert (s.reduce_range, s.activation_bits, s.vnni_flags) == (False, 8, ("avx512_vnni",))


def test_scheme_reduce_range_without_vnni(tmp_path: Path) -> None:
    s = qat.detect_quant_scheme("ptq", cpuinfo=_cpuinfo(tmp_path, "avx512f avx512bw"))
    assert s.reduce_range and s.activation_bits == 7 and "lacks VNNI" in s.reason
    assert s.as_dict()["method"] == "ptq"
    json.dumps(s.as_dict())  # recordable as is


def test_scheme_unreadable_cpuinfo_is_conservative(tmp_path: Path) -> None:
    s = qat.detect_quant_scheme(cpuinfo=tmp_path / "missing")
    assert s.reduce_range and "unreadable" in s.reason


def test_scheme_forced(tmp_path: Path) -> None:
    s = qat.detect_quant_scheme(reduce_range=True, cpuinfo=_cpuinfo(tmp_path, "avx_vnni"))
    assert s.reduce_range and "forced" in s.reason


def _activation_qmax(gm: torch.fx.GraphModule) -> set[int]:
    target = torch.ops.quantized_decomposed.quantize_per_tensor.default
    return {int(n.args[4]) for n in gm.graph.nodes if n.target == target}


def test_qat_converts_to_qdq_graph_and_keeps_accuracy() -> None:
    x, y, xt, yt = digits()
    model, result = qat_bundle()
    assert result.scheme["method"] == "qat" and len(result.losses) == 1
    targets = {str(n.target) for n in result.model.graph.nodes}
    assert "quantized_decomposed.quantize_per_tensor.default" in targets
    assert "quantized_decomposed.dequantize_per_channel.default" in targets
    acc_fp32 = accuracy(model, xt, yt)
    acc_int8 = accuracy(result.model, xt, yt)
    assert acc_fp32 > 0.9
    assert acc_int8 >= acc_fp32 - 0.03, (acc_fp32, acc_int8)
    # dynamic batch on the converted graph
    with torch.no_grad():
        assert result.model(torch.from_numpy(xt[:1])).shape == (1, 10)
        assert result.model(torch.from_numpy(xt[:7])).shape == (7, 10)


def test_qat_with_callback_and_reduce_range() -> None:
    x, y, xt, yt = digits()
    calls = []

    def train(prepared: torch.fx.GraphModule) -> None:
        calls.append(qat.finetune_qat(prepared, x[:128], y[:128], epochs=1))

    result = qat.quantize_qat(trained_tiny(), torch.from_numpy(x[:4]), train, reduce_range=True)
    assert len(calls) == 1 and result.scheme["reduce_range"] is True
    assert _activation_qmax(result.model) == {127}  # 7-bit activations in the graph
    assert accuracy(result.model, xt, yt) > 0.85


def _bn_buffers(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gm.named_buffers() if "running" in k or "mean" in k}


def test_freeze_bn_stats_keeps_running_statistics_while_training() -> None:
    x, y, xt, yt = digits()
    prepared = qat.prepare_qat(trained_tiny(), torch.from_numpy(x[:8]), reduce_range=False)
    before = _bn_buffers(prepared)
    assert before, "the prepared graph carries BatchNorm running statistics"
    assert qat.freeze_bn_stats(prepared) > 0
    assert qat.freeze_bn_stats(prepared) == 0  # already frozen
    # train-mode forward + an SGD step: weights move, the running statistics do not
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    loss = torch.nn.functional.cross_entropy(
        prepared(torch.from_numpy(x[:64])), torch.from_numpy(y[:64])
    )
    loss.backward()
    opt.step()
    after = _bn_buffers(prepared)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a frozen graph computes what the eval graph computes on the same weights and scales
    prepared.apply(qat.disable_observer)
    xb = torch.from_numpy(xt[:32])
    with torch.no_grad():
        frozen_out = prepared(xb)
        qat.move_exported_model_to_eval(prepared)
        assert torch.allclose(frozen_out, prepared(xb), atol=1e-5)


def test_finetune_freezes_bn_after_the_given_epoch() -> None:
    x, y, xt, yt = digits()
    prepared = qat.prepare_qat(trained_tiny(), torch.from_numpy(x[:8]), reduce_range=False)
    qat.finetune_qat(prepared, x[:256], y[:256], epochs=1, freeze_bn_after_epochs=0)
    qat.move_exported_model_to_train(prepared)
    frozen = _bn_buffers(prepared)
    qat.finetune_qat(prepared, x[:256], y[:256], epochs=1, freeze_bn_after_epochs=0)
    assert all(torch.equal(frozen[k], v) for k, v in _bn_buffers(prepared).items())
    unfrozen = qat.prepare_qat(trained_tiny(), torch.from_numpy(x[:8]), reduce_range=False)
    start = _bn_buffers(unfrozen)
    qat.finetune_qat(unfrozen, x[:256], y[:256], epochs=1)
    assert any(not torch.equal(start[k], v) for k, v in _bn_buffers(unfrozen).items())
    assert accuracy(qat.convert_qat(prepared), xt, yt) > 0.85


def test_quantizing_leaves_the_float_model_untouched() -> None:
    """QAT trains its own copy: a PTQ of the same model afterwards sees the float weights."""
    import copy

    x, y, _, _ = digits()
    model = copy.deepcopy(trained_tiny()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat.quantize_qat(model, torch.from_numpy(x[:8]), (x[:256], y[:256]), epochs=1, lr=0.05)
    qat.ptq(model, torch.from_numpy(x[:8]), x[:128], reduce_range=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # the caller's mode is not switched either


def test_ptq_beside_qat() -> None:
    x, y, xt, yt = digits()
    model = trained_tiny()
    result = qat.ptq(model, torch.from_numpy(x[:8]), x[:128], reduce_range=False)
    assert result.scheme["method"] == "ptq" and result.losses == []
    assert _activation_qmax(result.model) == {255}
    assert accuracy(result.model, xt, yt) >= accuracy(model, xt, yt) - 0.05


def test_save_load_roundtrip(tmp_path: Path) -> None:
    x, _, xt, _ = digits()
    _, result = qat_bundle()
    path = qat.save_quantized(result.model, torch.from_numpy(x[:8]), tmp_path / "m.pt2", {"k": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temp file left
    loaded = qat.load_quantized(path).module()
    with torch.no_grad():
        a = result.model(torch.from_numpy(xt)).numpy()
        b = loaded(torch.from_numpy(xt)).numpy()
        assert loaded(torch.from_numpy(xt[:3])).shape == (3, 10)
    np.testing.assert_array_equal(a, b)
    meta = qat.read_quantized_meta(path)
    assert meta["k"] == 1 and meta["quant_scheme"]["method"] == "qat"


def _rewrite(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


@pytest.fixture(scope="module")
def saved_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, _, _, _ = digits()
    _, result = qat_bundle()
    return qat.save_quantized(
        result.model, torch.from_numpy(x[:8]), tmp_path_factory.mktemp("q") / "m.pt2"
    )


def test_load_truncated_raises_model_file_error(saved_pt2: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(saved_pt2.read_bytes()[: saved_pt2.stat().st_size // 2])
    with pytest.raises(ModelFileError) as err:
        qat.load_quantized(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelFileError):
        qat.load_quantized(tmp_path / "missing.pt2")


def _edit_model_json(fn):
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            fn(program)
            return json.dumps(program).encode()
        return data

    return edit


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.__setitem__("guards_code", ["__import__('os').system('true')"]),
        lambda p: p["graph_module"]["graph"]["nodes"][0].__setitem__(
            "target", "torch.serialization.os.system"
        ),
    ],
    ids=["guard-code", "foreign-operator"],
)
def test_load_refuses_code_carrying_archives(saved_pt2: Path, tmp_path: Path, mutate) -> None:
    bad = tmp_path / "evil.pt2"
    _rewrite(saved_pt2, bad, _edit_model_json(mutate))
    with pytest.raises(ModelFileError, match="refusing to load"):
        qat.load_quantized(bad)


def test_load_refuses_pickled_payloads(saved_pt2: Path, tmp_path: Path) -> None:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    bad = tmp_path / "pickled.pt2"
    _rewrite(saved_pt2, bad, edit)
    with pytest.raises(ModelFileError, match="pickled"):
        qat.load_quantized(bad)
    extra = tmp_path / "extra.pt2"
    _rewrite(saved_pt2, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr("m/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ModelFileError, match="unexpected entry"):
        qat.load_quantized(extra)


def test_fast_pattern_capture_restores_torchao() -> None:
    from torchao.quantization.pt2e import qat_utils, utils

    before = utils._get_aten_graph_module_for_pattern
    with qat.fast_pattern_capture():
        assert utils._get_aten_graph_module_for_pattern is qat._capture_pattern
        assert qat_utils._get_aten_graph_module_for_pattern is qat._capture_pattern
    assert utils._get_aten_graph_module_for_pattern is before


def test_each_job_has_its_module_and_qat_reexports_them() -> None:
    """Scheme, archive and pattern capture live in their own modules; the names other code and
    older callers import from ``nasforge.compress.qat`` are those very objects."""
    from nasforge.compress import pattern_capture, quant_archive, quant_scheme

    homes = {
        quant_scheme: ["VNNI_FLAGS", "QuantScheme", "RuntimeX86Quantizer", "cpu_flags",
                       "detect_quant_scheme", "make_quantizer"],
        quant_archive: ["MAX_BATCH", "load_quantized", "read_quantized_meta", "save_quantized",
                        "to_exported_program"],
        pattern_capture: ["fast_pattern_capture", "_capture_pattern"],
    }  # fmt: skip
    for module, names in homes.items():
        for name in names:
            assert getattr(qat, name) is getattr(module, name), name
    assert set(qat.__all__) >= {n for names in homes.values() for n in names if n[0] != "_"}
    assert all(hasattr(qat, name) for name in qat.__all__)
    # the flow's own public functions stay in qat
    for name in ("prepare_qat", "finetune_qat", "convert_qat", "quantize_qat", "ptq"):
        assert getattr(qat, name).__module__ == "nasforge.compress.qat", name
