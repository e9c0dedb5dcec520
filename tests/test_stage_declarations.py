"""Every caller of a stage agrees with its declaration (``nasforge.stages.declarations``).

The stage functions, the KFP components (literal functions: KFP compiles them from their
signatures) and the ``dvc.yaml`` stages are written by hand; these tests fail when one of them
gains, loses or renames an input or output that the declaration does not (and the other way
round). The CLI is derived from the declarations: a property test parses random valid command
lines of every stage. The runner's part of the contract — only declared inputs, a stage that
needs its MLflow run refuses tracking off, the last stage ends the pipeline's parent run whoever
calls it — runs for real (SQLite MLflow store, the CLI in a subprocess, the component's body).
"""

from __future__ import annotations

import importlib
import inspect
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nasforge.stages import StageContext, StageResult
from nasforge.stages.declarations import DECLARATIONS, STAGES, StageDeclaration, declaration
from tests.conftest import REPO, tiny_params, with_tracking_db

NASFORGE = str(Path(sys.executable).parent / "nasforge")
IDS = [d.name for d in DECLARATIONS]
#: The Python type of each input kind in a stage function's signature.
PY_TYPES = {"artifact": Path, "artifacts": list[Path], "int": int, "str": str}
#: The KFP type of each value kind in a component's signature.
KFP_VALUES = {"int": "Integer", "str": "String"}
ARTIFACT = "system.Artifact@0.0.1"
#: dvc.yaml: the raw datasets' folder (``data.source: data/<name>``), read through the params
#: rather than an input; every other dependency is an artifact another stage wrote.
RAW_DATA = "data"


def _component(decl: StageDeclaration):
    module = importlib.import_module(f"nasforge.components.{decl.module}")
    return getattr(module, decl.module)


def test_declarations_are_consistent():
    assert len(set(STAGES)) == len(STAGES) == len(DECLARATIONS)
    for decl in DECLARATIONS:
        names = [i.name for i in decl.inputs]
        assert len(set(names)) == len(names), decl.name
        assert {"params", "output", "ctx", "params_json", "parent_run_id"}.isdisjoint(names)
        if decl.run_name is not None:  # formatted with value inputs only
            decl.label({i.name: 0 for i in decl.inputs if not i.is_path})
    with pytest.raises(Exception, match="unknown stage 'nope'"):
        declaration("nope")


@pytest.mark.parametrize("decl", DECLARATIONS, ids=IDS)
def test_stage_function_takes_the_declared_inputs(decl):
    fn = decl.function()
    sig = inspect.signature(fn)
    names = list(sig.parameters)
    assert names[0] == "params" and names[-2:] == ["output", "ctx"], names
    assert names[1:-2] == [i.name for i in decl.inputs], f"{decl.name}: {names}"
    hints = typing.get_type_hints(fn)
    for inp in decl.inputs:
        assert hints[inp.name] == PY_TYPES[inp.kind], (decl.name, inp.name, hints[inp.name])
    assert hints["ctx"] is StageContext and hints["return"] is StageResult


@pytest.mark.parametrize("decl", DECLARATIONS, ids=IDS)
def test_component_signature_matches_the_declaration(decl):
    spec = _component(decl).component_spec
    inputs = {k: (v.type, v.is_artifact_list) for k, v in spec.inputs.items()}
    want = {"params_json": ("String", False), "parent_run_id": ("String", False)}
    for inp in decl.inputs:
        if inp.kind == "artifact":
            want[inp.name] = (ARTIFACT, False)
        elif inp.kind == "artifacts":
            # A collected list, or one folder when each task gets one (a candidate's export).
            got = inputs.get(inp.name)
            assert got in ((ARTIFACT, True), (ARTIFACT, False)), (decl.name, inp.name, got)
            want[inp.name] = got
        else:
            want[inp.name] = (KFP_VALUES[inp.kind], False)
    assert inputs == want, decl.name
    outputs = {k: v.type for k, v in (spec.outputs or {}).items()}
    want_out = {decl.output: ARTIFACT}
    if decl.loop_metric:
        want_out["Output"] = "List"
    assert outputs == want_out, decl.name


@pytest.mark.parametrize("decl", DECLARATIONS, ids=IDS)
def test_component_body_runs_the_declared_stage(decl, monkeypatch, tmp_path):
    """The body hands every input to the runner under its declared name, folders as paths."""
    import nasforge.stages.runner as runner

    calls = []

    def fake_execute(stage, params, output, **kwargs):
        calls.append((stage, params, output, kwargs))
        return StageResult(metrics={decl.loop_metric: 3} if decl.loop_metric else {})

    monkeypatch.setattr(runner, "execute", fake_execute)
    comp = _component(decl)
    art = lambda name: SimpleNamespace(path=str(tmp_path / name))  # noqa: E731 - a KFP artifact
    kwargs = {}
    for name, spec in comp.component_spec.inputs.items():
        if name in ("params_json", "parent_run_id"):
            continue
        if spec.type == ARTIFACT:
            kwargs[name] = (
                [art(f"{name}-0"), art(f"{name}-1")] if spec.is_artifact_list else art(name)
            )
        else:
            kwargs[name] = 7 if spec.type == "Integer" else "onnxruntime-cpu"
    params = tiny_params()
    returned = comp.python_func(
        params_json=params.to_json(),
        parent_run_id="",
        **kwargs,
        **{decl.output: art("out")},
    )
    ((stage, got_params, output, passed),) = calls
    assert stage == decl.name and got_params == params and output == tmp_path / "out"
    assert passed.pop("parent_run_id") is None  # "" (the pipeline default): not nested
    assert set(passed) == {i.name for i in decl.inputs}
    for inp in decl.inputs:
        value = passed[inp.name]
        if inp.kind == "artifacts":
            assert isinstance(value, list) and all(isinstance(v, Path) for v in value)
        elif inp.kind == "artifact":
            assert value == tmp_path / inp.name
        else:
            assert type(value) is PY_TYPES[inp.kind]
    if decl.loop_metric:
        assert returned == [0, 1, 2]


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _flags(tokens: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    current = None
    for tok in tokens:
        if tok.startswith("--"):
            current = tok
            assert current not in flags, f"{tok} given twice"
            flags[current] = []
        else:
            assert current is not None, f"positional argument {tok!r}"
            flags[current].append(tok)
    return flags


def test_dvc_yaml_has_exactly_the_declared_stages():
    assert list(_dvc_stages()) == list(STAGES)


@pytest.mark.parametrize("decl", DECLARATIONS, ids=IDS)
def test_dvc_stage_matches_the_declaration(decl):
    stage = _dvc_stages()[decl.name]
    spec = stage.get("do", stage)
    tokens = shlex.split(" ".join(spec["cmd"].split()))
    assert tokens[:2] == ["nasforge", decl.name], tokens
    flags = _flags(tokens[2:])
    assert set(flags) == {"--params", "--output", *(i.option for i in decl.inputs)}, decl.name
    assert len(flags["--output"]) == 1 and flags["--params"] == ["params.yaml"]
    inputs_paths = set()
    for inp in decl.inputs:
        values = flags[inp.option]
        assert values and (inp.kind == "artifacts" or len(values) == 1), (decl.name, inp.option)
        if inp.is_path:
            inputs_paths.update(values)
    assert spec["outs"] == flags["--output"], decl.name
    deps = set(spec.get("deps", []))
    assert {d for d in deps if d != RAW_DATA} == inputs_paths, decl.name
    for section in spec.get("params", []):  # every params section DVC watches exists
        assert section in type(tiny_params()).model_fields, (decl.name, section)


def _paths(n: int):
    return st.lists(
        st.from_regex(r"[a-z][a-z0-9_/-]{0,12}", fullmatch=True), min_size=n, max_size=4
    )


@st.composite
def _command_line(draw):
    decl = draw(st.sampled_from(DECLARATIONS))
    argv = [decl.name, "--output", draw(_paths(1))[0]]
    want = {}
    for inp in draw(st.permutations(decl.inputs)):
        if inp.kind == "artifact":
            value = draw(_paths(1))[0]
            argv += [inp.option, value]
            want[inp.name] = Path(value)
        elif inp.kind == "artifacts":
            values = draw(_paths(1))
            argv += [inp.option, *values]
            want[inp.name] = [Path(v) for v in values]
        elif inp.kind == "int":
            value = draw(st.integers(0, 10_000))
            argv += [inp.option, str(value)]
            want[inp.name] = value
        else:
            value = draw(st.from_regex(r"[a-z][a-z0-9:_-]{0,20}", fullmatch=True))
            argv += [inp.option, value]
            want[inp.name] = value
    return decl, argv, want


@settings(max_examples=300, deadline=None)
@given(_command_line())
def test_cli_parses_every_declared_input(case):
    from nasforge.cli import _stage_inputs, build_parser

    decl, argv, want = case
    args = build_parser().parse_args(argv)
    assert args.command == decl.name
    assert _stage_inputs(decl, args) == want


def test_runner_takes_only_declared_inputs(tmp_path):
    from nasforge.errors import ConfigError
    from nasforge.stages.runner import execute

    p = tiny_params()
    with pytest.raises(ConfigError, match=r"stage prune: unknown input\(s\) models; missing"):
        execute("prune", p, tmp_path / "o", tracking=False, dataset=tmp_path, models=tmp_path)
    with pytest.raises(ConfigError, match=r"missing input\(s\) candidate \(it takes dataset"):
        execute("train", p, tmp_path / "o", tracking=False, dataset=tmp_path, search=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NASFORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_promote_refuses_tracking_off_in_one_line(tmp_path):
    (tmp_path / "bench").mkdir()
    args = ["promote", "--output", "out", "--benchmarks", "bench", "--no-tracking"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: promote ") and "--no-tracking" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _run_status(uri: str, run_id: str) -> str:
    from nasforge.tracking.mlflow_runs import client

    return client(uri).get_run(run_id).info.status


def test_report_ends_the_parent_run_for_every_caller(tmp_path, monkeypatch):
    """CLI (as DVC calls it) and KFP component alike: the parent run is FINISHED after report;
    a report that fails leaves it running (``nasforge run`` marks it FAILED)."""
    from nasforge.tracking.mlflow_runs import client, open_parent_run
    from tests.test_report import _artifacts

    monkeypatch.chdir(tmp_path)
    p = with_tracking_db(tiny_params(), tmp_path)
    uri, exp = p.tracking.uri, p.tracking.experiment
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))

    def report_runs(parent: str) -> list:
        c = client(uri)
        return c.search_runs(
            [c.get_experiment_by_name(exp).experiment_id],
            f"tags.mlflow.parentRunId = '{parent}' and tags.`nasforge.stage` = 'report'",
        )

    # 1. the CLI, as dvc.yaml and a user call it
    art = _artifacts(tmp_path / "cli", True)
    parent = open_parent_run(uri, exp, "via-cli", {})
    args = ["report", "--params", "p.yaml", "--parent-run-id", parent, "--output", "r1"]
    args += ["--search", str(art["search"]), "--promotion", str(art["promotion"])]
    proc = _cli([*args, "--benchmarks", *map(str, art["benchmarks"])], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _run_status(uri, parent) == "FINISHED"
    (run,) = report_runs(parent)
    assert run.info.status == "FINISHED"

    # 2. the KFP component's body
    from nasforge.components.report import report

    art = _artifacts(tmp_path / "kfp", True)
    parent = open_parent_run(uri, exp, "via-kfp", {})
    report.python_func(
        params_json=p.to_json(),
        parent_run_id=parent,
        search=SimpleNamespace(path=str(art["search"])),
        promotion=SimpleNamespace(path=str(art["promotion"])),
        benchmarks=[SimpleNamespace(path=str(b)) for b in art["benchmarks"]],
        report=SimpleNamespace(path=str(tmp_path / "r2")),
    )
    assert _run_status(uri, parent) == "FINISHED" and (tmp_path / "r2" / "summary.json").is_file()

    # 3. a report that fails does not end the pipeline's run
    parent = open_parent_run(uri, exp, "failing", {})
    (tmp_path / "empty").mkdir()
    bad = [*args[:4], parent, "--output", "r3", "--search", "empty", "--promotion", "empty"]
    proc = _cli([*bad, "--benchmarks", "empty"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert _run_status(uri, parent) == "RUNNING"
    (run,) = report_runs(parent)
    assert run.info.status == "FAILED"
