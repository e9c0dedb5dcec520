"""Early exit: multi-exit network, training on digits, calibration, staged ONNX, serving."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch

from nasforge.errors import ConfigError, ModelFileError
from nasforge.serve.early_exit import EarlyExitRunner, load_manifest
from nasforge.serve.process import ServerProcess
from nasforge.serve.variants import variants_from_dir
from nasforge.space.cell import CellNetworkShape, build_cell_network
from nasforge.space.early_exit import (
    NEVER,
    MultiExitNetwork,
    calibrate_thresholds,
    cascade,
    exit_logits,
    export_staged,
    fit_multi_exit,
    multi_exit_loss,
    save_thresholds,
)
from nasforge.space.nb201 import CellSpec
from tests.test_serve import settled_metrics

SPEC = CellSpec(
    ("nor_conv_3x3", "nor_conv_1x1", "skip_connect", "nor_conv_3x3", "none", "skip_connect")
)


def _net(channels: int = 8, cells: int = 1, exits=(0, 1), seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    shape = CellNetworkShape(
        in_channels=1, num_classes=10, channels=channels, cells_per_stage=cells
    )
    return MultiExitNetwork(build_cell_network(SPEC, shape), exits)


# ----------------------------------------------------------------------------- network


def test_final_exit_is_the_backbone_and_exits_follow_stages():
    m = _net(cells=2).eval()
    x = torch.randn(5, 1, 8, 8)
    outs = m(x)
    assert len(outs) == m.num_exits == 3
    assert all(o.shape == (5, 10) for o in outs)
    torch.testing.assert_close(outs[-1], m.backbone(x))
    # 2 cells per stage: stage 0 ends at layer 1, stage 1 (reduction + 2 cells) at layer 4.
    assert m.exit_layers == (1, 4)
    assert [e.classifier.in_features for e in m.exits] == [8, 16]
    with pytest.raises(ConfigError, match="exit_stages must lie"):
        MultiExitNetwork(m.backbone, [2])
    with pytest.raises(ConfigError, match="increasing and unique"):
        MultiExitNetwork(m.backbone, [1, 0])


def test_multi_exit_loss_weights_and_distillation():
    y = torch.tensor([0, 1])
    good = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    bad = -good
    # Only the weighted exit counts: a zero weight removes the bad exit from the loss.
    assert multi_exit_loss([bad, good], y, weights=[0.0, 1.0]) < 0.01
    assert multi_exit_loss([bad, good], y, weights=[1.0, 1.0]) > 1.0
    # Distillation pulls the early exit towards the final one; gradients reach only the student.
    student = bad.clone().requires_grad_(True)
    teacher = good.clone().requires_grad_(True)
    multi_exit_loss([student, teacher], y, kd_alpha=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is not None
    with pytest.raises(ConfigError, match="exit weights"):
        multi_exit_loss([bad, good], y, weights=[1.0])


# ----------------------------------------------------------------------------- calibration


def _logits_with_confidence(conf: np.ndarray, cls: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """Two-class logits whose softmax max is ``conf`` on class ``cls``."""
    out = np.zeros((len(conf), n_classes), dtype=np.float64)
    out[np.arange(len(conf)), cls] = np.log(conf / (1 - conf))
    return out


def test_cascade_thresholds_route_samples():
    conf = np.array([0.9, 0.6, 0.55])
    early = _logits_with_confidence(conf, np.array([1, 1, 1]))
    final = _logits_with_confidence(np.full(3, 0.99), np.array([0, 0, 0]))
    pred, where = cascade([early, final], [0.0])
    assert where.tolist() == [0, 0, 0] and pred.tolist() == [1, 1, 1]
    pred, where = cascade([early, final], [NEVER])
    assert where.tolist() == [1, 1, 1] and pred.tolist() == [0, 0, 0]
    pred, where = cascade([early, final], [0.6])
    assert where.tolist() == [0, 0, 1] and pred.tolist() == [1, 1, 0]
    with pytest.raises(ConfigError, match="thresholds for"):
        cascade([early, final], [0.5, 0.5])


def test_calibration_picks_lowest_threshold_within_budget():
    # Final exit right on all 10 samples. Exit 0 is wrong only on the sample of confidence 0.6.
    conf = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55])
    y = np.zeros(10, dtype=np.int64)
    cls = np.zeros(10, dtype=np.int64)
    cls[8] = 1
    early = _logits_with_confidence(conf, cls)
    final = _logits_with_confidence(np.full(10, 0.9), y)
    strict = calibrate_thresholds([early, final], y, max_drop=0.0)
    # No loss allowed: everything above the wrong sample may leave, i.e. threshold 0.65.
    assert strict.thresholds[0] == pytest.approx(0.65)
    assert strict.accuracy == 1.0 and strict.reference_accuracy == 1.0
    assert strict.exit_fractions == pytest.approx([0.8, 0.2])
    loose = calibrate_thresholds([early, final], y, max_drop=0.1)
    # One wrong answer in ten is within a 10-point budget: every sample may leave at exit 0.
    assert loose.thresholds[0] == pytest.approx(0.55)
    assert loose.accuracy == pytest.approx(0.9)
    assert loose.exit_fractions == pytest.approx([1.0, 0.0])


def test_calibration_stops_at_the_first_violation_from_the_top():
    # The most confident early answer is wrong; a lower one is right where the final exit is
    # wrong. Threshold 0.7 would keep the accuracy (one loss, one gain), but 0.99 above it
    # does not: the exit stays closed rather than trusting the lucky low-confidence sample.
    y = np.zeros(3, dtype=np.int64)
    early = _logits_with_confidence(np.array([0.99, 0.7, 0.6]), np.array([1, 0, 1]))
    final = _logits_with_confidence(np.full(3, 0.9), np.array([0, 1, 0]))
    cal = calibrate_thresholds([early, final], y, max_drop=0.0)
    assert cal.thresholds == [NEVER]
    assert cal.accuracy == pytest.approx(2 / 3) == cal.reference_accuracy


def test_calibration_disables_a_useless_exit_and_shares_the_budget():
    y = np.zeros(4, dtype=np.int64)
    always_wrong = _logits_with_confidence(np.full(4, 0.99), np.ones(4, dtype=np.int64))
    right = _logits_with_confidence(np.array([0.9, 0.8, 0.7, 0.6]), y)
    final = _logits_with_confidence(np.full(4, 0.9), y)
    cal = calibrate_thresholds([always_wrong, right, final], y, max_drop=0.0)
    assert cal.thresholds[0] == NEVER  # every exit there would cost accuracy
    assert cal.thresholds[1] == pytest.approx(0.6)
    assert cal.exit_fractions == pytest.approx([0.0, 1.0, 0.0])
    # With a 25-point budget the first exit may take one wrong answer; exit 0's samples all have
    # the same confidence, so taking any means taking all four: still disabled.
    cal = calibrate_thresholds([always_wrong, right, final], y, max_drop=0.25)
    assert cal.thresholds[0] == NEVER
    with pytest.raises(ConfigError, match="max_drop"):
        calibrate_thresholds([right, final], y, max_drop=-0.1)
    with pytest.raises(ConfigError, match="non-empty"):
        calibrate_thresholds([right, final[:2]], y)
    with pytest.raises(ConfigError, match="intermediate exit"):
        calibrate_thresholds([final], y)


# ----------------------------------------------------------------------------- trained model


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
    """A small multi-exit network trained on digits, calibrated and exported in stages."""
    from nasforge.data.prepared import load_prepared

    data = load_prepared(digits_dir)
    xtr, ytr = data.tensors("train")
    xva, yva = data.tensors("val")
    xte, yte = data.tensors("test")
    model = _net(channels=16, cells=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only spin on a shared machine
    try:
        history = fit_multi_exit(model, xtr, ytr, epochs=6, batch_size=64, lr=0.1, kd_alpha=0.5)
    finally:
        torch.set_num_threads(threads)
    cal = calibrate_thresholds(exit_logits(model, xva), yva.numpy(), max_drop=0.01)
    out = tmp_path_factory.mktemp("ee") / "digits-ee"
    export_staged(model, xtr[:4], out, cal, metadata={"candidate": "digits-ee"})
    return model, cal, history, out, (xte, yte)


def test_training_learns_every_exit(trained):
    model, cal, history, _, (xte, yte) = trained
    assert history[-1] < history[0]
    accs = [float((lg.argmax(1) == yte.numpy()).mean()) for lg in exit_logits(model, xte)]
    # Ten classes: chance is 0.1. Every exit must have learned something; the first exit sees
    # only one cell's globally pooled features and is the weakest.
    assert accs[0] > 0.3 and accs[1] > 0.8 and accs[2] > 0.9, accs
    assert cal.accuracy >= cal.reference_accuracy - cal.max_drop - 1e-9


def test_staged_onnx_equals_torch_exits(trained):
    model, _, _, out, (xte, _) = trained
    ref = exit_logits(model, xte[:50])
    for runtime in ("onnxruntime", "openvino"):
        runner = EarlyExitRunner(out, runtime, threads=1)
        got = runner.run_all_exits(xte[:50].numpy())
        assert len(got) == 3
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_runner_skips_stages_by_threshold(trained):
    model, cal, _, out, (xte, _) = trained
    x = xte[:40].numpy()
    ref = exit_logits(model, xte[:40])
    runner = EarlyExitRunner(out, "onnxruntime", threads=1)
    assert runner.thresholds == pytest.approx(cal.thresholds)
    calls = []
    stages = list(runner._stages)
    runner._stages = [
        lambda f, s=s, k=k: calls.append((k, len(f))) or s(f) for k, s in enumerate(stages)
    ]
    runner.set_thresholds([0.0, 0.0])
    res = runner.run(x)
    assert res.exits.tolist() == [0] * 40
    np.testing.assert_allclose(res.logits, ref[0], rtol=1e-4, atol=1e-4)
    assert calls == [(0, 40)]  # stages 1 and 2 never ran
    calls.clear()
    runner.set_thresholds([NEVER, NEVER])
    res = runner.run(x)
    assert res.exits.tolist() == [2] * 40
    np.testing.assert_allclose(res.logits, model.backbone(xte[:40]).detach().numpy(), atol=1e-4)
    assert calls == [(0, 40), (1, 40), (2, 40)]
    calls.clear()
    # Calibrated: only the rows that did not leave go on, and the decisions match torch's.
    runner.set_thresholds(cal.thresholds)
    res = runner.run(x)
    pred, where = cascade(ref, cal.thresholds)
    assert np.mean(res.exits == where) >= 0.95
    assert np.mean(res.logits.argmax(1) == pred) >= 0.95
    left_after_0 = int((res.exits > 0).sum())
    assert calls[0] == (0, 40)
    if left_after_0:
        assert calls[1] == (1, left_after_0)
    else:
        assert len(calls) == 1


def test_broken_exports_are_rejected(trained, tmp_path):
    _, _, _, out, _ = trained
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "thresholds.json").write_text(json.dumps({"thresholds": [0.5]}))
    with pytest.raises(ModelFileError, match="need 2 thresholds"):
        load_manifest(bad)
    save_thresholds([0.5, 0.5], bad)
    (bad / "stage1.onnx").unlink()
    with pytest.raises(ModelFileError, match="stage file missing"):
        EarlyExitRunner(bad)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    model = _net()
    with pytest.raises(ModelFileError, match="not an early-exit export"):
        export_staged(model, torch.zeros(2, 1, 8, 8), other)
    assert (other / "keep.txt").is_file()


def test_variants_from_dir_finds_early_exit(trained):
    _, cal, _, out, _ = trained
    specs = variants_from_dir(out.parent, "onnxruntime-cpu")
    assert [(s.name, s.kind) for s in specs] == [("digits-ee", "early_exit")]
    assert specs[0].size_bytes > 0
    with pytest.raises(ModelFileError, match="no int8"):
        variants_from_dir(out.parent, "onnxruntime-cpu-int8")


def test_serve_early_exit_variant_over_http(trained):
    model, cal, _, out, (xte, _) = trained
    srv = ServerProcess(
        out.parent, "onnxruntime-cpu", threads=1, max_batch_size=4, max_queue_delay_ms=2,
        slo_ms=1000, switching=False,
    )  # fmt: skip
    try:
        srv.wait_ready()
        x = xte[:8].numpy()
        req = urllib.request.Request(
            srv.url + "/predict",
            data=json.dumps({"inputs": x.tolist()}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            doc = json.loads(r.read())
        pred, where = cascade(exit_logits(model, xte[:8]), cal.thresholds)
        assert doc["variant"] == "digits-ee" and doc["num_exits"] == 3
        assert np.mean(np.array(doc["exits"]) == where) >= 7 / 8
        assert np.mean(np.array(doc["classes"]) == pred) >= 7 / 8
        m = settled_metrics(srv.url, lambda m: m.get("samples", 0) >= 8)
        per_exit = m["samples_per_exit"]["digits-ee"]
        assert sum(per_exit.values()) == 8
        assert m["config"]["variants"][0]["kind"] == "early_exit"
    finally:
        srv.stop()
