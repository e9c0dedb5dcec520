"""The ``.pt2`` archive a quantized model travels in between the qat and export stages.

The converted model is saved as a ``torch.export`` program with a dynamic batch
(:func:`save_quantized`). ``torch.export.load`` is not safe on hostile files (pickled payloads are
loaded with ``weights_only=False``, guard code is ``exec``-ed, operator names resolve to any
``torch.*`` attribute), so :func:`load_quantized` first validates the archive against what
:func:`save_quantized` writes and refuses anything else.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule

from nasforge.atomic import atomic_file
from nasforge.compress.quant_scheme import SCHEME_META_KEY
from nasforge.errors import ModelFileError

#: Largest batch the exported graphs accept; any finite bound works, ONNX keeps it symbolic.
MAX_BATCH = 1 << 16
_META_FILE = "nasforge_meta.json"


def example_batch(example_input: torch.Tensor) -> torch.Tensor:
    """Return a contiguous example with batch >= 2 (torch.export specializes a batch of 1)."""
    x = example_input.detach().to(torch.float32)
    if x.shape[0] < 2:
        x = torch.cat([x, x], dim=0)
    # clone: a view would make torch.export.save store the whole underlying storage
    return x[:8].clone().contiguous()


def batch_dynamic_shapes() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for ``torch.export`` of a one-input model: the batch is dynamic."""
    return ({0: Dim("batch", min=1, max=MAX_BATCH)},)


def to_exported_program(gm_or_ep: GraphModule | ExportedProgram, example_input: torch.Tensor):
    """Return an ExportedProgram with a dynamic batch for a converted GraphModule (or pass one)."""
    if isinstance(gm_or_ep, ExportedProgram):
        return gm_or_ep
    return torch.export.export(
        gm_or_ep, (example_batch(example_input),), dynamic_shapes=batch_dynamic_shapes()
    )


def save_quantized(
    gm_or_ep: GraphModule | ExportedProgram,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Save a converted INT8 model as a ``torch.export`` ``.pt2`` archive (atomic write).

    Args:
        gm_or_ep: the converted GraphModule (from :func:`convert_qat`/:func:`ptq`) or an
            ExportedProgram of it.
        example_input: a batch of inputs (to re-export with a dynamic batch).
        path: the ``.pt2`` file to write.
        meta: JSON-serializable metadata stored inside the archive (the quant scheme is added).

    Returns:
        The path written.
    """
    path = Path(path)
    meta = dict(meta or {})
    if isinstance(gm_or_ep, GraphModule) and SCHEME_META_KEY in gm_or_ep.meta:
        meta.setdefault("quant_scheme", gm_or_ep.meta[SCHEME_META_KEY])
    ep = to_exported_program(gm_or_ep, example_input)
    with atomic_file(path, suffix=".tmp.pt2") as tmp:
        torch.export.save(ep, tmp, extra_files={_META_FILE: json.dumps(meta, sort_keys=True)})
    return path


# --- safe loading -------------------------------------------------------------------------------

_ALLOWED_ENTRY = re.compile(
    r"^[^/]+/("
    r"archive_format|archive_version|byteorder|version|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/(weight_\d+|model_weights_config\.json)"
    r"|data/constants/(tensor_\d+|constant_\d+|model_constants_config\.json)"
    rf"|extra/{re.escape(_META_FILE)}"
    r")$"
)
_ALLOWED_TARGET = re.compile(
    r"^(torch\.ops\.(aten|quantized_decomposed)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+"
    r"|_operator\.(getitem|add|mul|sub|floordiv|truediv))$"
)
# sympy parses symbolic-shape expressions (``Symbol('s77', positive=True, integer=True)``) with
# eval: allow quoted symbol names, arithmetic, and a short list of sympy constructors only.
_QUOTED_NAME = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*'")
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_ +\-*/(),.<>=%]*$")
_EXPR_WORDS = frozenset(
    "Symbol Integer Mul Add Pow Rational Mod FloorDiv CeilToInt FloorToInt IntTrueDiv Max Min "
    "True False positive integer nonnegative negative real finite oo".split()
)


def _safe_expr(expr: str) -> bool:
    rest = _QUOTED_NAME.sub("", expr)
    if not _EXPR_CHARS.match(rest):
        return False
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest)
    return all(w in _EXPR_WORDS or re.fullmatch(r"[su]\d+", w) for w in words)


def _walk(obj: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _validate_pt2(path: Path) -> dict[str, Any]:
    """Check that a .pt2 holds only what save_quantized writes; return the nasforge metadata."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path}: not a valid .pt2 archive ({exc})") from exc
    with zf:
        names = zf.namelist()
        bad = [n for n in names if not _ALLOWED_ENTRY.match(n)]
        if bad:
            raise ModelFileError(f"{path}: unexpected entry {bad[0]!r}; refusing to load")
        try:
            model_json = next(n for n in names if n.endswith("/models/model.json"))
            for name in names:
                if name.endswith("_config.json"):
                    config = json.loads(zf.read(name))
                    if any(k == "use_pickle" and v for k, v in _walk(config)):
                        raise ModelFileError(f"{path}: pickled payload in {name}; refusing to load")
            program = json.loads(zf.read(model_json))
            for name in names:
                if name.endswith("sample_inputs/model.pt"):
                    # torch.export.load retries failed loads with weights_only=False
                    torch.load(io.BytesIO(zf.read(name)), weights_only=True)
            meta_name = next((n for n in names if n.endswith(f"/extra/{_META_FILE}")), None)
            meta = json.loads(zf.read(meta_name)) if meta_name else {}
        except ModelFileError:
            raise
        except StopIteration as exc:
            raise ModelFileError(f"{path}: no models/model.json in archive") from exc
        except Exception as exc:  # zlib, JSON, unpickling: all mean a damaged or foreign file
            raise ModelFileError(f"{path}: corrupt .pt2 archive ({type(exc).__name__})") from exc
    if program.get("guards_code"):
        raise ModelFileError(f"{path}: archive carries guard code; refusing to load")
    if program.get("graph_module", {}).get("graph", {}).get("custom_obj_values"):
        raise ModelFileError(f"{path}: archive carries custom objects; refusing to load")
    for key, value in _walk(program):
        if key == "target" and isinstance(value, str) and not _ALLOWED_TARGET.match(value):
            raise ModelFileError(f"{path}: operator {value!r} not allowed; refusing to load")
        if key == "expr_str" and isinstance(value, str) and not _safe_expr(value):
            raise ModelFileError(f"{path}: malformed shape expression; refusing to load")
    return meta


def load_quantized(path: str | os.PathLike[str]) -> ExportedProgram:
    """Load a ``.pt2`` written by :func:`save_quantized`, refusing anything that could run code.

    Args:
        path: the archive.

    Returns:
        The ExportedProgram (call ``.module()`` for a runnable GraphModule). Its nasforge
        metadata (quant scheme, ...) is available via :func:`read_quantized_meta`.

    Raises:
        ModelFileError: the file is missing, truncated, corrupt or holds unexpected content.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    _validate_pt2(path)
    try:
        return torch.export.load(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: cannot load .pt2 ({type(exc).__name__}: {first})") from exc


def read_quantized_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the JSON metadata stored by :func:`save_quantized` (validates the archive)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    return _validate_pt2(path)
