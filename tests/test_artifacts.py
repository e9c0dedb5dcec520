"""The artifacts between stages: round trips over random valid instances, legacy files still
read, and corrupt, truncated, foreign or newer files refused with one line naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nasforge.artifacts.base import (
    HEADER,
    ArtifactVersionError,
    JsonArtifact,
)
from nasforge.artifacts.benchmark_report import BenchmarkReport, find_reports
from nasforge.artifacts.dataset import ARRAYS, Dataset
from nasforge.artifacts.export_bundle import ExportBundle
from nasforge.artifacts.model import (
    LEGACY_PRUNED_FORMAT,
    LEGACY_PRUNED_WEIGHTS,
    MODEL_JSON,
    RESERVED,
    WEIGHTS,
    ModelArtifact,
)
from nasforge.artifacts.promotion import Promotion
from nasforge.artifacts.quantized_model import PROGRAM, QuantizedModel
from nasforge.artifacts.search_result import SearchHistory, SearchResult, read_pareto
from nasforge.errors import DataError, ModelFileError, NasforgeError

NASFORGE = [str(Path(sys.executable).parent / "nasforge")]
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | floats | names
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(names, json_values, max_size=5)


def extra_fields(cls: type[JsonArtifact]) -> st.SearchStrategy[dict[str, Any]]:
    """Fields a newer writer might add: any name but the dataclass's and the header's."""
    taken = {*HEADER, *cls.__dataclass_fields__}
    return st.dictionaries(names.filter(lambda k: k not in taken), json_values, max_size=4)


datasets = st.builds(
    Dataset,
    source=names,
    seed=st.integers(0, 2**31),
    classes=st.lists(names, min_size=1, max_size=6),
    input_shape=st.lists(st.integers(1, 512), min_size=3, max_size=3),
    mean=st.lists(floats, min_size=1, max_size=3),
    std=st.lists(floats, min_size=1, max_size=3),
    counts=st.fixed_dictionaries(
        {
            "train": st.integers(0, 10**6),
            "val": st.integers(0, 10**6),
            "test": st.integers(0, 10**6),
        }
    ),
    sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    extra=extra_fields(Dataset),
)
search_results = st.builds(
    SearchResult,
    space=st.sampled_from(["cell", "macro", "toy"]),
    candidates=st.lists(json_objects, max_size=4),
    objectives=st.lists(names, max_size=4),
    teacher=st.none() | json_objects,
    front=st.lists(json_objects, max_size=3),
    extra=extra_fields(SearchResult),
)
histories = st.builds(
    SearchHistory,
    trials=st.lists(json_objects, max_size=4),
    supernet_loss=json_values,
    strategy=names,
    extra=extra_fields(SearchHistory),
)
keys = st.sampled_from(["onnxruntime/fp32", "onnxruntime/int8", "openvino/int8", "x/y"])
bundles = st.builds(
    ExportBundle,
    candidate=st.none() | names,
    arch_str=st.none() | names,
    files=st.dictionaries(keys, names),
    size_bytes=st.dictionaries(keys, st.integers(0, 2**40)),
    parity=st.dictionaries(keys, json_objects),
    parity_min_top1=st.none() | floats,
    quant_scheme=st.none() | json_objects,
    model=json_objects,
    history=st.lists(json_objects, max_size=3),
    quantization=st.none() | st.dictionaries(keys, json_objects, min_size=1),
    extra=extra_fields(ExportBundle),
)
reports = st.builds(
    BenchmarkReport,
    candidate=st.none() | names,
    results=st.dictionaries(st.sampled_from(["fp32", "int8"]), json_objects),
    target=st.none() | names | json_objects,
    arch_str=st.none() | names,
    quant_scheme=st.none() | json_objects,
    system=json_objects,
    extra=extra_fields(BenchmarkReport),
)
promotions = st.builds(
    Promotion,
    decisions=st.lists(json_objects, max_size=4),
    gate=json_objects,
    extra=extra_fields(Promotion),
)
quantized = st.builds(
    QuantizedModel,
    quant_scheme=json_objects,
    meta=st.dictionaries(
        names.filter(lambda k: k not in (*HEADER, "quant_scheme")), json_values, max_size=5
    ),
)
JSON_ARTIFACTS = {
    "dataset": datasets,
    "search_result": search_results,
    "search_history": histories,
    "export_bundle": bundles,
    "benchmark_report": reports,
    "promotion": promotions,
    "quantized_model": quantized,
}


def _prepare(folder: Path, art: JsonArtifact) -> None:
    """The files beside the document that its reader checks for."""
    if isinstance(art, Dataset):
        (folder / ARRAYS).write_bytes(b"")
    if isinstance(art, QuantizedModel):
        (folder / PROGRAM).write_bytes(b"")


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(JSON_ARTIFACTS))
def test_json_artifacts_round_trip(kind):
    @EXAMPLES
    @given(JSON_ARTIFACTS[kind])
    def check(art: JsonArtifact) -> None:
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            _prepare(folder, art)
            file = art.write(folder)
            doc = json.loads(file.read_text())
            assert doc["schema"] == art.SCHEMA and doc["version"] == art.VERSION
            back = type(art).read(folder)
            assert back == art
            assert type(art).read(file) == art  # the document's path works too
            assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []

    check()


tensor_names = st.text("abcdefgh._0123", min_size=1, max_size=10)


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 10).to(dtype)


layer_shape_dicts = st.dictionaries(
    tensor_names,
    st.fixed_dictionaries({"type": st.sampled_from(["conv", "linear", "batchnorm"])})
    | st.dictionaries(names, st.integers(0, 4096), max_size=4),
    max_size=4,
)
model_meta = st.dictionaries(names.filter(lambda k: k not in RESERVED), json_values, max_size=5)
models = st.builds(
    ModelArtifact,
    meta=model_meta,
    state=st.dictionaries(tensor_names, tensors(), max_size=4),
    layer_shapes=st.none() | layer_shape_dicts,
)


def _same_model(a: ModelArtifact, b: ModelArtifact) -> None:
    assert a.meta == b.meta and a.layer_shapes == b.layer_shapes and a.variant == b.variant
    assert a.state.keys() == b.state.keys()
    for k, t in a.state.items():
        assert t.dtype == b.state[k].dtype and torch.equal(t, b.state[k]), k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models)
def test_model_artifact_round_trips_dense_and_pruned(art):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        art.write(folder)
        assert sorted(p.name for p in folder.iterdir()) == [MODEL_JSON, WEIGHTS]
        doc = json.loads((folder / MODEL_JSON).read_text())
        assert (doc["schema"], doc["version"], doc["variant"]) == (
            "nasforge.model",
            2,
            "dense" if art.layer_shapes is None else "pruned",
        )
        _same_model(ModelArtifact.read(folder), art)
        art.write(folder)  # replaced as a whole, nothing left beside it
        assert sorted(p.name for p in Path(d).iterdir()) == ["m"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_meta, st.dictionaries(tensor_names, tensors(), max_size=4), layer_shape_dicts)
def test_pruned_v1_folders_on_disk_are_read_as_the_pruned_variant(meta, state, shapes):
    """Folders of the old ``nasforge-pruned-v1`` format, written exactly as it wrote them."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(folder / LEGACY_PRUNED_WEIGHTS)
        )
        doc = {"format": LEGACY_PRUNED_FORMAT, "meta": meta, "shapes": shapes}
        (folder / MODEL_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
        art = ModelArtifact.read(folder)
        _same_model(art, ModelArtifact(meta, state, shapes))
        assert art.variant == "pruned"
        art.write(folder / "again")  # rewritten in the one format
        _same_model(ModelArtifact.read(folder / "again"), art)


def test_a_pruned_v1_network_loads_with_its_architecture(tmp_path):
    """An old pruned cell model rebuilds to the same outputs through ``load_model``."""
    from nasforge.compress.prune import load_model_files, prune_structured
    from nasforge.models import load_model
    from nasforge.space.cell import CellNetworkShape, build_cell_network
    from nasforge.space.nb201 import CellSpec

    spec = CellSpec(
        ("nor_conv_3x3", "skip_connect", "nor_conv_1x1", "avg_pool_3x3", "none", "nor_conv_3x3")
    )
    shape = CellNetworkShape(1, 10, channels=8, stages=2)
    torch.manual_seed(0)
    net = build_cell_network(spec, shape)
    x = torch.from_numpy(np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32))
    pruned, _ = prune_structured(net, x[:4], channel_ratio=0.4)
    pruned.eval()
    from nasforge.artifacts.model import layer_shapes

    meta = {"space": "cell", "arch_str": spec.arch_str, "shape": shape.to_dict()}
    folder = tmp_path / "old"
    folder.mkdir()
    state = {k: v.detach().contiguous() for k, v in pruned.state_dict().items()}
    save_file(state, str(folder / LEGACY_PRUNED_WEIGHTS))
    doc = {"format": LEGACY_PRUNED_FORMAT, "meta": meta, "shapes": layer_shapes(pruned)}
    (folder / MODEL_JSON).write_text(json.dumps(doc, sort_keys=True))
    loaded, got = load_model(folder)
    assert got == meta
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    assert load_model_files(folder)[2] == doc["shapes"]


def test_version_1_files_written_before_the_header_are_read(tmp_path):
    # A model.json of the old models.py format: the description alone.
    torch.manual_seed(0)
    (tmp_path / "m").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "m" / WEIGHTS))
    (tmp_path / "m" / MODEL_JSON).write_text(json.dumps({"arch_str": "a", "shape": {}}))
    art = ModelArtifact.read(tmp_path / "m")
    assert art.meta == {"arch_str": "a", "shape": {}} and art.variant == "dense"
    # A cell search's pareto.json had no space key: it was a cell search.
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "pareto.json").write_text(json.dumps({"candidates": [], "shape": {}}))
    assert read_pareto(tmp_path / "s") == {
        "space": "cell",
        "candidates": [],
        "objectives": [],
        "teacher": None,
        "front": [],
        "shape": {},
    }
    # Minimal benchmark and export documents of older writers.
    (tmp_path / "b" / "cand-0").mkdir(parents=True)
    (tmp_path / "b" / "cand-0" / "benchmark.json").write_text(
        json.dumps({"candidate": "cand-0", "results": {"fp32": {"test_accuracy": 0.5}}})
    )
    [(folder, rep)] = find_reports([tmp_path / "b"])
    assert folder == tmp_path / "b" / "cand-0" and rep.results["fp32"]["test_accuracy"] == 0.5
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "export.json").write_text(json.dumps({"candidate": "c"}))
    assert ExportBundle.read(tmp_path / "e").candidate == "c"
    # A qat model.json: the description plus the scheme.
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / PROGRAM).write_bytes(b"")
    (tmp_path / "q" / MODEL_JSON).write_text(json.dumps({"candidate": "c", "quant_scheme": {}}))
    q = QuantizedModel.read(tmp_path / "q")
    assert q.meta == {"candidate": "c"} and q.quant_scheme == {}


def test_a_search_result_always_names_its_space():
    with pytest.raises(ValueError, match="space"):
        SearchResult(space="", candidates=[])
    with pytest.raises(ModelFileError, match="space"):
        SearchResult.from_dict({"candidates": []})


# -- refused files ---------------------------------------------------------------------------


ALL_KINDS = sorted([*JSON_ARTIFACTS, "model"])


VALID: dict[str, JsonArtifact] = {
    "dataset": Dataset("digits", 0, ["0", "1"], [1, 8, 8], [0.5], [0.2], {"train": 2}, "ab"),
    "search_result": SearchResult(space="cell", candidates=[{"id": "cand-0"}]),
    "search_history": SearchHistory(trials=[{"number": 0}], strategy="hybrid"),
    "export_bundle": ExportBundle(candidate="cand-0", files={"onnxruntime/fp32": "fp32.onnx"}),
    "benchmark_report": BenchmarkReport(candidate="cand-0", results={"fp32": {}}),
    "promotion": Promotion(decisions=[{"target": "onnxruntime-cpu"}]),
    "quantized_model": QuantizedModel(quant_scheme={"reduce_range": False}, meta={"a": 1}),
}


def _valid_folder(kind: str, folder: Path) -> Path:
    """A valid artifact of ``kind`` in ``folder``; returns its JSON document."""
    if kind == "model":
        return ModelArtifact({"a": 1}, {"w": torch.zeros(3)}).write(folder) / MODEL_JSON
    art = VALID[kind]
    _prepare(folder, art)
    return art.write(folder)


def _read(kind: str, folder: Path) -> Any:
    if kind == "model":
        return ModelArtifact.read(folder)
    cls = {
        "dataset": Dataset,
        "search_result": SearchResult,
        "search_history": SearchHistory,
        "export_bundle": ExportBundle,
        "benchmark_report": BenchmarkReport,
        "promotion": Promotion,
        "quantized_model": QuantizedModel,
    }[kind]
    return cls.read(folder)


def _one_line(err: BaseException, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text and text, text
    for n in needles:
        assert n in text, (n, text)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_truncated_and_corrupt_documents_are_one_line_errors(kind):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data) -> None:
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            file = _valid_folder(kind, folder)
            text = file.read_text()
            how = data.draw(st.sampled_from(["truncate", "garbage", "array", "bytes"]))
            if how == "truncate":
                file.write_text(text[: data.draw(st.integers(0, len(text) - 1))])
            elif how == "garbage":
                file.write_text(data.draw(st.text(min_size=1)).replace("{", "") + "}")
            elif how == "array":
                file.write_text(json.dumps(data.draw(st.lists(json_values, max_size=3))))
            else:
                file.write_bytes(b"\xff\xfe\x00" + text.encode()[:10])
            with pytest.raises(NasforgeError) as err:
                _read(kind, folder)
            _one_line(err.value, str(file))

    check()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unknown_versions_and_other_schemas_are_refused(kind):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers() | names | st.none() | floats | st.booleans())
    def check(version) -> None:
        if type(version) is int and version in (1, 2):
            return
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d)
            file = _valid_folder(kind, folder)
            doc = json.loads(file.read_text())
            doc["version"] = version
            file.write_text(json.dumps(doc))
            with pytest.raises(ArtifactVersionError) as err:
                _read(kind, folder)
            _one_line(err.value, str(file), repr(version), "reads versions 1, 2")
            if type(version) is int and version > 2:
                assert "newer" in str(err.value)
            doc["version"] = 2
            doc["schema"] = "nasforge.something-else"
            file.write_text(json.dumps(doc))
            with pytest.raises(ArtifactVersionError) as err:
                _read(kind, folder)
            _one_line(err.value, str(file), "nasforge.something-else", "1, 2")

    check()


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("dataset", "classes", "digits"),
        ("dataset", "seed", "0"),
        ("search_result", "candidates", {"cand-0": {}}),
        ("search_result", "space", 3),
        ("export_bundle", "size_bytes", {"onnxruntime/fp32": "big"}),
        ("benchmark_report", "results", []),
        ("promotion", "decisions", None),
        ("quantized_model", "quant_scheme", "int8"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(tmp_path, kind, field, value):
    file = _valid_folder(kind, tmp_path)
    doc = json.loads(file.read_text())
    doc[field] = value
    file.write_text(json.dumps(doc))
    with pytest.raises(NasforgeError) as err:
        _read(kind, tmp_path)
    _one_line(err.value, str(file), field)


def test_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        Dataset.read(tmp_path)
    with pytest.raises(ModelFileError, match="not a model artifact"):
        ModelArtifact.read(tmp_path)
    with pytest.raises(ModelFileError, match="not a quantized model"):
        QuantizedModel.read(tmp_path)
    with pytest.raises(ModelFileError, match="not a search output"):
        SearchResult.read(tmp_path)
    with pytest.raises(ModelFileError, match="not a benchmark folder"):
        find_reports([tmp_path])
    # Weights: missing, truncated; layer sizes of a pruned model: missing.
    folder = ModelArtifact({}, {"w": torch.zeros(64)}).write(tmp_path / "m")
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ModelFileError, match="corrupt or truncated weights") as err:
        ModelArtifact.read(folder)
    _one_line(err.value, str(weights))
    weights.unlink()
    with pytest.raises(ModelFileError, match="weights missing"):
        ModelArtifact.read(folder)
    doc = {"schema": "nasforge.model", "version": 2, "variant": "pruned"}
    (folder / MODEL_JSON).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="layer_shapes"):
        ModelArtifact.read(folder)
    (folder / MODEL_JSON).write_text(json.dumps({**doc, "variant": "sparse"}))
    with pytest.raises(ModelFileError, match="variant 'sparse'"):
        ModelArtifact.read(folder)
    (folder / MODEL_JSON).write_text(json.dumps({"format": "nasforge-pruned-v2", "meta": {}}))
    with pytest.raises(ArtifactVersionError, match="nasforge-pruned-v2.*nasforge-pruned-v1"):
        ModelArtifact.read(folder)


def test_a_description_may_not_use_the_formats_keys(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        ModelArtifact({"variant": "x"}, {}).write(tmp_path / "m")
    with pytest.raises(ValueError, match="schema"):
        Promotion(decisions=[], extra={"schema": "x"}).write(tmp_path)
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


# -- through the stage commands --------------------------------------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(NASFORGE + args, cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_version_error(proc: subprocess.CompletedProcess, file: Path, version: int) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(file) in lines[0] and f"version {version}" in lines[0], lines[0]
    assert "reads versions 1, 2" in lines[0] and "Traceback" not in proc.stderr


def test_stage_commands_refuse_newer_artifacts_in_one_line(tmp_path, digits_dir):
    # A search result from a newer nasforge, given to train.
    search = tmp_path / "search"
    SearchResult(space="cell", candidates=[{"id": "cand-0"}]).write(search)
    doc = json.loads((search / "pareto.json").read_text())
    (search / "pareto.json").write_text(json.dumps({**doc, "version": 3}))
    args = ["--data", str(digits_dir), "--output", "out", "--no-tracking"]
    proc = _cli(["train", *args, "--search", str(search), "--candidate", "0"], tmp_path)
    _assert_version_error(proc, search / "pareto.json", 3)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    # A model from a newer nasforge, given to prune.
    model = ModelArtifact({"arch_str": "a", "shape": {}}, {"w": torch.zeros(1)}).write(
        tmp_path / "model"
    )
    doc = json.loads((model / MODEL_JSON).read_text())
    (model / MODEL_JSON).write_text(json.dumps({**doc, "version": 7}))
    proc = _cli(["prune", *args, "--model", str(model)], tmp_path)
    _assert_version_error(proc, model / MODEL_JSON, 7)
    assert not (tmp_path / "out").exists()
