"""The CLI's contract with users: bad input is one line on stderr, exit 2, no traceback, no output."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

NASFORGE = [str(Path(sys.executable).parent / "nasforge")]


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **env} if env else None
    return subprocess.run(
        NASFORGE + args, cwd=cwd, capture_output=True, text=True, timeout=300, env=full_env
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_params_field_of_wrong_type(tmp_path):
    (tmp_path / "p.yaml").write_text("search:\n  trials: lots\n")
    proc = _run(["prepare-data", "--params", "p.yaml", "--output", "out"], tmp_path)
    _assert_one_line_error(proc, "search.trials", "lots")
    assert not (tmp_path / "out").exists()


def test_dataset_path_that_does_not_exist(tmp_path):
    (tmp_path / "p.yaml").write_text("data:\n  source: /no/such/cifar.tar\n")
    proc = _run(
        ["prepare-data", "--params", "p.yaml", "--output", "out", "--no-tracking"], tmp_path
    )
    _assert_one_line_error(proc, "dataset not found", "/no/such/cifar.tar")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def _search_with_targets(tmp_path, digits_dir, targets: str) -> subprocess.CompletedProcess:
    (tmp_path / "p.yaml").write_text(f"targets: [{targets}]\n")
    args = ["search", "--params", "p.yaml", "--data", str(digits_dir), "--output", "s"]
    return _run([*args, "--no-tracking"], tmp_path)


def test_unknown_target_name(tmp_path, digits_dir):
    proc = _search_with_targets(tmp_path, digits_dir, "onnxruntime-cpu, quantum-tpu")
    _assert_one_line_error(proc, "quantum-tpu")
    assert not (tmp_path / "s").exists()


def test_gpu_target_on_cpu_machine(tmp_path, digits_dir):
    proc = _search_with_targets(tmp_path, digits_dir, "tensorrt-gpu")
    if proc.returncode == 0:  # pragma: no cover - only on a machine with a GPU and TensorRT
        pytest.skip("this machine has a GPU with TensorRT")
    # Nothing else to search for: the GPU target has no latency table here (checked before the
    # supernet is trained, so the error comes within seconds).
    _assert_one_line_error(proc, "tensorrt-gpu", "GPU node")
    assert not (tmp_path / "s").exists()


def test_missing_input_artifact(tmp_path):
    proc = _run(
        ["train", "--data", "nowhere", "--search", "s", "--candidate", "0", "--output", "o"],
        tmp_path,
    )
    _assert_one_line_error(proc, "--data", "nowhere")


@pytest.mark.parametrize("stage", ["prune", "qat"])
def test_corrupt_model_file_is_rejected_without_output(tmp_path, digits_dir, stage):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(
        '{"arch_str": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|", "shape": {"in_channels": 1, "num_classes": 10, "channels": 8}}'
    )
    (model / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    proc = _run(
        [
            stage,
            "--data",
            str(digits_dir),
            "--model",
            str(model),
            "--output",
            "out",
            "--no-tracking",
        ],
        tmp_path,
    )
    _assert_one_line_error(proc, "weights")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unreachable_tracking_server(tmp_path):
    (tmp_path / "p.yaml").write_text("tracking:\n  uri: http://127.0.0.1:9\n")
    proc = _run(["prepare-data", "--params", "p.yaml", "--output", "out"], tmp_path)
    _assert_one_line_error(proc, "unreachable")
    assert not (tmp_path / "out").exists()


def test_run_rejects_bad_input_before_starting(tmp_path):
    (tmp_path / "p.yaml").write_text("targets: [onnxruntime-cpu, nope]\n")
    proc = _run(["run", "--params", "p.yaml", "--runs-dir", "runs"], tmp_path)
    _assert_one_line_error(proc, "nope")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["prepare-data", "run"])
def test_empty_params_file_is_refused(tmp_path, command):
    """An empty file would run every default (no accuracy budget) and could move a champion."""
    (tmp_path / "p.yaml").write_text("# nothing here\n")
    args = ["--params", "p.yaml"] + (["--output", "out"] if command != "run" else [])
    proc = _run([command, *args], tmp_path)
    _assert_one_line_error(proc, "p.yaml", "empty")
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_run_on_a_corrupt_dataset_fails_at_once_naming_the_stage(tmp_path):
    """Through kfp.local: no retries, and the last line is the stage's own one-line error."""
    (tmp_path / "data.npz").write_bytes(bytes(range(256)) * 64)  # not a zip archive
    (tmp_path / "p.yaml").write_text("data:\n  source: data.npz\n")
    proc = _run(["run", "--params", "p.yaml"], tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: prepare-data: ") and "data.npz" in last, last
    assert "Retrying" not in proc.stdout + proc.stderr
    assert not re.search(r"^\[ *\d+/\d+\] search ", proc.stdout, re.M)  # never started
    assert re.search(r"^\[ *0/\d+\] prepare-data +FAILED after ", proc.stdout, re.M)
    # kfp.local's output and the task's own are in the task's log, named before the error
    log = re.search(r"^==> prepare-data failed; its log: (\S+)$", proc.stderr, re.M).group(1)
    text = (tmp_path / log).read_text()
    assert "Got executor_input" in text and "data.npz" in text and "Traceback" in text
    assert "executor_input" not in proc.stdout + proc.stderr
    assert len((proc.stdout + proc.stderr).splitlines()) < 12
    assert not (tmp_path / "runs" / "latest").exists()


def test_every_command_explains_every_option():
    """``--help`` of each command says what each of its options is for."""
    from nasforge.cli import build_parser

    def commands(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*path, name))
        yield path, parser

    seen = 0
    for path, parser in commands(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"nasforge {' '.join(path)} {action.option_strings[0]}"
                seen += 1
    assert seen > 60
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for needle in (
        "params.yaml",
        "resume",
        "--fresh",
        "logs/",
        "latest/",
        "kfp-local/",
        ".resume/",
    ):
        assert needle in text, needle


def test_profile_builds_a_calibrated_table(tmp_path):
    import json

    proc = _run(
        ["profile", "--target", "onnxruntime-cpu", "--space", "cell", "--input-shape", "1,6,6",
         "--channels", "4", "--num-classes", "4", "--batch-sizes", "1", "--threads", "1",
         "--rounds", "1", "--calibration-networks", "8", "--out", "t.json"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["machine"]["threads"] == 1 and table["machine"]["runtime"] == "onnxruntime"
    assert table["calibration"]["1"]["n_networks"] == 8
    assert any(k.startswith("op:nor_conv_3x3") for k in table["blocks"]["1"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--target", "no-such-target"], "onnxruntime-cpu"),  # lists the known targets
        (["--target", "onnxruntime-cpu", "--rounds", "0"], "rounds >= 1"),
        (
            ["--target", "onnxruntime-cpu", "--precision", "int4"],
            "--precision must be fp32 or int8",
        ),
        (["--target", "onnxruntime-cpu-int8", "--precision", "fp32"], "contradicts"),
        (["--target", "table:raspi4_latency_ms", "--precision", "int8"], "cannot be profiled"),
        (["--target", "tensorrt-gpu", "--precision", "int8"], "tensorrt-gpu"),
    ],
)
def test_profile_bad_input(tmp_path, args, needle):
    proc = _run(["profile", *args, "--out", "t.json"], tmp_path)
    _assert_one_line_error(proc, needle)
    assert not (tmp_path / "t.json").exists()


def test_profile_int8_builds_a_separate_quantized_table(tmp_path):
    import json

    proc = _run(
        ["profile", "--target", "openvino-cpu", "--space", "cell", "--input-shape", "1,6,6",
         "--channels", "4", "--num-classes", "4", "--batch-sizes", "1", "--threads", "1",
         "--rounds", "1", "--calibration-networks", "3", "--precision", "int8"],
        tmp_path,
        env={"NASFORGE_LATENCY_TABLES": str(tmp_path / "tables")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (path,) = (tmp_path / "tables").glob("openvino-cpu__cell__int8__*.json")
    table = json.loads(path.read_text())
    assert table["precision"] == table["machine"]["precision"] == "int8"
    assert table["settings"]["quantization"]["format"] == "QDQ"
    assert table["calibration"]["1"]["n_networks"] == 3
    assert "int8 latency table for openvino-cpu" in proc.stdout


@pytest.mark.parametrize(
    "flag, needle",
    [("--max-body-bytes", "max_body_bytes must be >= 1"), ("--max-items-per-request", "max_items")],
)
def test_serve_request_limits_reach_the_server(tmp_path, flag, needle):
    """The server's request limits are set from the command line (0 is refused by the server)."""
    proc = _run(
        ["serve", "--source", str(tmp_path), "--target", "onnxruntime-cpu", flag, "0"], tmp_path
    )
    _assert_one_line_error(proc, needle)
