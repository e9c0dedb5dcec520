"""The quantized model: the INT8 ``torch.export`` program (``model_int8.pt2``) + ``model.json``.

``model.json`` is the fp32 model's description (architecture, normalisation, history) plus the
INT8 scheme (``quant_scheme``); the program is validated before it is loaded
(:func:`nasforge.compress.quant_archive.load_quantized`, never arbitrary pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nasforge.artifacts.base import JsonArtifact, artifact_folder
from nasforge.errors import ModelFileError

if TYPE_CHECKING:
    from torch.export import ExportedProgram

MODEL_JSON = "model.json"
PROGRAM = "model_int8.pt2"


@dataclass
class QuantizedModel(JsonArtifact):
    """``model.json`` of an INT8 model folder.

    Attributes:
        quant_scheme: The quantizer's settings (``reduce_range``, VNNI, symmetric ...).
        meta: The model's description: ``candidate``, ``arch_str``, ``space`` and the space's
            architecture fields, ``input_shape``, ``mean``, ``std``, ``classes``, ``history``
            (written at the top level of the document).
    """

    SCHEMA: ClassVar[str] = "nasforge.quantized-model"
    FILE: ClassVar[str] = MODEL_JSON
    WHAT: ClassVar[str] = "quantized model"

    quant_scheme: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_body(self) -> dict[str, Any]:  # noqa: D102
        if "quant_scheme" in self.meta:
            raise ValueError("the model description may not hold quant_scheme (a field)")
        return {**self.meta, "quant_scheme": self.quant_scheme}

    @classmethod
    def from_body(cls, body: Any, version: int, file: Path) -> QuantizedModel:  # noqa: D102
        # The document is flat: the description's fields beside ``quant_scheme``.
        flat = {k: v for k, v in body.items() if k != "quant_scheme"}
        wrapped = {"quant_scheme": body.get("quant_scheme"), "meta": flat}
        return super().from_body(wrapped, version, file)

    @classmethod
    def read(cls, path: str | Path) -> QuantizedModel:
        """Read the description of the INT8 model folder ``path`` (the program must be there).

        Raises:
            ModelFileError: ``model_int8.pt2`` or ``model.json`` missing, or ``model.json``
                corrupt.
            ArtifactVersionError: A version this nasforge does not read.
        """
        path = artifact_folder(path, MODEL_JSON)
        if not (path / PROGRAM).is_file():
            raise ModelFileError(f"not a quantized model (no {PROGRAM}): {path}")
        return super().read(path)


def load_program(path: str | Path) -> ExportedProgram:
    """The INT8 program of folder ``path``, validated before loading.

    Raises:
        ModelFileError: Missing, truncated, corrupt or unexpected content.
    """
    from nasforge.compress.quant_archive import load_quantized

    return load_quantized(Path(path) / PROGRAM)


def save_program(gm: Any, example: Any, path: str | Path, scheme: dict[str, Any]) -> Path:
    """Save the converted INT8 module ``gm`` as the program of folder ``path`` (atomic)."""
    from nasforge.compress.quant_archive import save_quantized

    Path(path).mkdir(parents=True, exist_ok=True)
    return save_quantized(gm, example, Path(path) / PROGRAM, meta={"scheme": scheme})
