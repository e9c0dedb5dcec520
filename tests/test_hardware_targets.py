"""Target registry: names, availability, table targets on the shared NB201 CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from nasforge.bench.harness import measure
from nasforge.errors import TargetError
from nasforge.hardware import targets
from nasforge.hardware.latency import latency_model
from nasforge.hardware.targets import (
    TableTarget,
    Target,
    get_target,
    list_targets,
    register_target,
    shared_data_dir,
)

NB201_CSV = shared_data_dir() / "nb201" / "nb201_dev.csv"
needs_nb201 = pytest.mark.skipif(
    not NB201_CSV.is_file(), reason=f"shared NB201 table not found at {NB201_CSV}"
)
ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"


def test_runtime_targets_registered():
    names = list_targets()
    for n in (
        "onnxruntime-cpu",
        "openvino-cpu",
        "openvino-cpu-int8",
        "onnxruntime-cuda",
        "tensorrt-gpu",
    ):
        assert n in names
    ov = get_target("openvino-cpu")
    assert (ov.runtime, ov.device, ov.precision, ov.kind) == ("openvino", "cpu", "fp32", "runtime")
    assert get_target("openvino-cpu-int8").precision == "int8"
    assert get_target("onnxruntime-cpu").is_available()


def test_unknown_target_lists_known():
    with pytest.raises(TargetError) as exc:
        get_target("tpu-v9")
    msg = str(exc.value)
    assert "unknown target 'tpu-v9'" in msg
    assert "onnxruntime-cpu" in msg and "openvino-cpu" in msg and "table:<column>" in msg
    assert "\n" not in msg


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists()


@pytest.mark.skipif(_has_gpu(), reason="this machine has an NVIDIA GPU")
@pytest.mark.parametrize("name", ["tensorrt-gpu", "onnxruntime-cuda"])
def test_gpu_targets_not_available_without_gpu(name: str):
    target = get_target(name)  # known name: no error until it is used
    assert not target.is_available()
    with pytest.raises(TargetError, match=f"target '{name}' is not available here: no NVIDIA GPU"):
        target.check_available()


def test_tensorrt_message_exact():
    if _has_gpu():
        pytest.skip("this machine has an NVIDIA GPU")
    with pytest.raises(TargetError) as exc:
        get_target("tensorrt-gpu").check_available()
    assert str(exc.value) == (
        "target 'tensorrt-gpu' is not available here: no NVIDIA GPU / TensorRT found"
    )


@needs_nb201
def test_table_target_lookup_shared_csv():
    t = get_target("table:raspi4_latency_ms", table=NB201_CSV)
    assert isinstance(t, TableTarget)
    assert (t.kind, t.runtime, t.name) == ("table", "table", "table:raspi4_latency_ms")
    assert t.is_available()
    with NB201_CSV.open() as f:
        row = next(r for r in csv.DictReader(f) if r["arch_str"] == ARCH)
    assert t.lookup(ARCH) == pytest.approx(float(row["raspi4_latency_ms"]))

    class Spec:  # anything with .arch_str (CellSpec) goes through the same interface
        arch_str = ARCH

    # search's one latency interface: the table-column latency model
    assert latency_model(t).predict_ms(Spec()) == t.lookup(ARCH)
    assert "table:fpga_latency_ms" in list_targets(NB201_CSV)


@needs_nb201
def test_table_target_errors():
    with pytest.raises(TargetError, match="not in"):
        get_target("table:raspi4_latency_ms", table=NB201_CSV).lookup("|bogus~0|")
    with pytest.raises(TargetError, match="no column 'nope_ms'.*raspi4_latency_ms"):
        get_target("table:nope_ms", table=NB201_CSV).lookup(ARCH)
    with pytest.raises(TargetError, match="latency table"):
        measure("x.onnx", get_target("table:raspi4_latency_ms"))


def test_table_target_one_csv_adds_a_device(tmp_path: Path):
    # Adding a device = one CSV with arch_str and a <device>_latency_ms column.
    path = tmp_path / "mydev.csv"
    path.write_text(f'arch_str,mydev_latency_ms\n"{ARCH}",3.5\n"|none~0|",\n')
    t = get_target("table:mydev_latency_ms", table=path)
    assert t.lookup(ARCH) == 3.5
    assert t.device == "mydev"
    with pytest.raises(TargetError, match="no latency"):
        t.lookup("|none~0|")
    with pytest.raises(TargetError, match="not found"):
        get_target("table:mydev_latency_ms", table=tmp_path / "missing.csv").check_available()


def test_adding_a_target_of_a_runtime_is_data():
    # A target is data (name, runtime, device, precision, options); its runtime does the work.
    register_target(Target("test-my-cpu", "onnxruntime", "cpu"))
    try:
        t = get_target("test-my-cpu")
        assert t == Target("test-my-cpu", "onnxruntime") and "test-my-cpu" in list_targets()
        assert t.is_available() and t.backend.name == "onnxruntime"
    finally:
        targets._REGISTRY.pop("test-my-cpu", None)
    with pytest.raises(TargetError, match="unknown runtime 'nope'"):
        register_target(Target("test-nope", "nope"))
