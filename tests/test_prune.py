"""Structured pruning (Torch-Pruning), unstructured sparsity and pruned-model files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nasforge.compress import prune
from nasforge.errors import ConfigError, ModelFileError
from tests.compress_helpers import TinyCellNet, accuracy, digits, train, trained_tiny


def _convs(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def _outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_prune_to_half_flops_removes_channels_with_finetune() -> None:
    x, y, xt, yt = digits()
    model = copy.deepcopy(trained_tiny())
    before = _convs(model)
    calls: list[int] = []

    def finetune(m: nn.Module) -> None:
        calls.append(1)
        train(m, x[:500], y[:500], epochs=1, lr=1e-3)

    pruned, report = prune.prune_structured(
        model, torch.from_numpy(x[:4]), target_flops_ratio=0.5, steps=2, finetune=finetune
    )
    assert len(calls) == 2 and len(report["steps"]) == 2
    assert 0.4 <= report["flops_ratio"] <= 0.55, report
    assert report["params_after"] < 0.6 * report["params_before"]
    assert report["steps"][0]["macs"] > report["steps"][1]["macs"]  # gradual schedule
    after = _convs(pruned)
    assert all(a <= b for a, b in zip(after, before, strict=True)) and sum(after) < sum(before)
    assert pruned.classifier.out_features == 10  # classifier ignored
    assert _outputs(pruned, xt[:7]).shape == (7, 10) and _outputs(pruned, xt[:1]).shape == (1, 10)
    assert accuracy(pruned.eval(), xt, yt) > 0.75  # random is 0.1; unpruned ~0.97


def test_taylor_importance_needs_gradients_and_prunes() -> None:
    x, y, _, _ = digits()
    with pytest.raises(ConfigError, match="grad_fn"):
        prune.prune_structured(
            TinyCellNet(), torch.from_numpy(x[:4]), channel_ratio=0.3, importance="taylor"
        )
    grads: list[int] = []

    def grad_fn(m: nn.Module) -> None:
        grads.append(1)
        loss = nn.functional.cross_entropy(m(torch.from_numpy(x[:64])), torch.from_numpy(y[:64]))
        loss.backward()

    model = copy.deepcopy(trained_tiny())
    _, report = prune.prune_structured(
        model,
        torch.from_numpy(x[:4]),
        channel_ratio=0.25,
        importance="taylor",
        grad_fn=grad_fn,
        steps=2,
    )
    assert len(grads) == 2 and report["params_after"] < report["params_before"]
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_raise_config_error() -> None:
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError):
        prune.prune_structured(TinyCellNet(), x)  # neither ratio
    with pytest.raises(ConfigError):
        prune.prune_structured(TinyCellNet(), x, channel_ratio=1.5)
    with pytest.raises(ConfigError):
        prune.prune_structured(TinyCellNet(), x, channel_ratio=0.3, importance="random")


def test_pruned_model_saves_and_loads_to_identical_outputs(tmp_path: Path) -> None:
    x, _, xt, _ = digits()
    model = copy.deepcopy(trained_tiny())
    pruned, report = prune.prune_structured(model, torch.from_numpy(x[:4]), channel_ratio=0.4)
    out = prune.save_model(pruned, tmp_path / "pruned", {"prune": report})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temp dirs left
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    state, meta, shapes = prune.load_model_files(out)
    assert meta["prune"]["params_after"] == report["params_after"]
    fresh = TinyCellNet()  # rebuilt from the "spec": unpruned shapes
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(state)  # shapes differ: a plain load cannot work
    prune.load_pruned_weights(fresh, state, shapes)
    np.testing.assert_array_equal(_outputs(fresh, xt), _outputs(pruned, xt))
    # shapes inferred from the weights alone work too
    np.testing.assert_array_equal(
        _outputs(prune.load_pruned_weights(TinyCellNet(), state), xt), _outputs(pruned, xt)
    )
    # saving again replaces the folder atomically
    prune.save_model(fresh, out, {"again": True})
    assert prune.load_model_files(out)[1] == {"again": True}


def test_corrupt_pruned_files_raise_model_file_error(tmp_path: Path) -> None:
    out = prune.save_model(TinyCellNet(), tmp_path / "m", {})
    weights = out / prune.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFileError) as err:
        prune.load_model_files(out)
    assert "\n" not in str(err.value)
    out2 = prune.save_model(TinyCellNet(), tmp_path / "m2", {})
    (out2 / prune.META_FILE).write_text("{not json")
    with pytest.raises(ModelFileError):
        prune.load_model_files(out2)
    with pytest.raises(ModelFileError):
        prune.load_model_files(tmp_path / "missing")
    state, _, _ = prune.load_model_files(prune.save_model(TinyCellNet(c=8), tmp_path / "m3", {}))
    with pytest.raises(ModelFileError, match="do not fit"):
        prune.load_pruned_weights(nn.Sequential(nn.Linear(3, 3)), state)


def test_unstructured_sparsity_reports_size() -> None:
    model = copy.deepcopy(trained_tiny())
    dense, compressed_dense = prune.weights_size_bytes(model)
    report = prune.sparsify_unstructured(model, 0.7)
    assert 0.68 <= report["sparsity"] <= 0.72
    assert report["dense_bytes"] == dense
    assert report["compressed_bytes"] < 0.8 * compressed_dense
    assert float((model.classifier.weight == 0).float().mean()) < 0.1  # classifier ignored


def test_lead_cell_network_prunes_and_reloads(tmp_path: Path) -> None:
    cell = pytest.importorskip("nasforge.space.cell")
    from nasforge.export.onnx import export_fp32
    from nasforge.export.parity import check_parity
    from nasforge.space.nb201 import CellSpec

    spec = CellSpec(
        ("nor_conv_3x3", "skip_connect", "nor_conv_1x1", "avg_pool_3x3", "none", "nor_conv_3x3")
    )
    shape = cell.CellNetworkShape(1, 10, channels=8, stages=2)
    torch.manual_seed(0)
    net = cell.build_cell_network(spec, shape)
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    pruned, report = prune.prune_structured(net, torch.from_numpy(x[:4]), target_flops_ratio=0.5)
    assert report["flops_ratio"] <= 0.55 and report["params_after"] < report["params_before"]
    out = prune.save_model(pruned, tmp_path / "m", {"arch": spec.arch_str})
    state, meta, shapes = prune.load_model_files(out)
    rebuilt = prune.load_pruned_weights(cell.build_cell_network(spec, shape), state, shapes)
    np.testing.assert_array_equal(_outputs(rebuilt, x), _outputs(pruned, x))
    onnx_path = export_fp32(rebuilt, torch.from_numpy(x[:4]), tmp_path / "m.onnx")
    assert check_parity(rebuilt, onnx_path, x, "onnxruntime")["top1_agreement"] >= 0.99
    json.dumps(report)  # the report is recordable as JSON
