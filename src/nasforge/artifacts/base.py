"""What every artifact shares: a schema name and version in its JSON, atomic writes, one-line errors.

Each artifact's JSON document starts with ``"schema": "nasforge.<artifact>"`` and
``"version": <int>``. A document without them was written before artifacts carried a header:
it is read as version :data:`LEGACY_VERSION`. A document of another schema, or of a version this
nasforge does not read (written by a newer one, or unknown), is refused with one line naming the
file, its version and the versions read here (:class:`ArtifactVersionError`).

Artifacts that are one JSON document plus files beside it subclass :class:`JsonArtifact`, a
dataclass whose fields are validated by pydantic on reading (the error names the bad field).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import pydantic

from nasforge.atomic import atomic_file
from nasforge.errors import ModelFileError, NasforgeError

SCHEMA_KEY = "schema"
VERSION_KEY = "version"
HEADER = (SCHEMA_KEY, VERSION_KEY)
#: The version of a document written before artifacts carried a header.
LEGACY_VERSION = 1


class ArtifactVersionError(ModelFileError):
    """An artifact file of another schema, or of a version this nasforge does not read."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def versions_text(reads: tuple[int, ...]) -> str:
    """``"1, 2"``: the versions read, for error messages."""
    return ", ".join(str(v) for v in reads)


def header_version(doc: Mapping[str, Any], file: Path, schema: str, reads: tuple[int, ...]) -> int:
    """The version of ``doc`` (a document of ``file``), checked against ``schema``/``reads``.

    Raises:
        ArtifactVersionError: Another schema, or a version not in ``reads``.
    """
    found = doc.get(SCHEMA_KEY)
    if found is None:
        return LEGACY_VERSION
    if found != schema:
        raise ArtifactVersionError(
            f"{file} is a {found!r} artifact, not a {schema!r} (this nasforge reads {schema} "
            f"versions {versions_text(reads)})"
        )
    version = doc.get(VERSION_KEY)
    if isinstance(version, bool) or not isinstance(version, int) or version not in reads:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(reads)
        why = "newer than this nasforge" if newer else "unknown"
        raise ArtifactVersionError(
            f"{file}: {schema} version {version!r} is {why}; this nasforge reads versions "
            f"{versions_text(reads)}"
        )
    return version


def load_json(file: Path, what: str, error: type[NasforgeError] = ModelFileError) -> dict[str, Any]:
    """The JSON object in ``file``.

    Raises:
        error: The file is missing, not JSON (truncated, corrupt) or not an object.
    """
    if not file.is_file():
        raise error(f"not a {what} (no {file.name}): {file.parent}")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise error(f"corrupt {file}: {_first_line(err)}") from None
    if not isinstance(doc, dict):
        raise error(f"corrupt {file}: not a JSON object")
    return doc


def read_document(
    file: Path,
    schema: str,
    reads: tuple[int, ...],
    what: str,
    error: type[NasforgeError] = ModelFileError,
) -> tuple[int, dict[str, Any]]:
    """(version, body without the header) of an artifact's JSON document.

    Raises:
        error: Missing, corrupt or truncated file.
        ArtifactVersionError: Another schema or an unread version.
    """
    doc = load_json(file, what, error)
    version = header_version(doc, file, schema, reads)
    return version, {k: v for k, v in doc.items() if k not in HEADER}


def write_document(
    file: Path, schema: str, version: int, body: Mapping[str, Any], default: Any = None
) -> None:
    """Write ``body`` under the header to ``file`` atomically (a kill leaves the old file or none).

    Args:
        file: The JSON file.
        schema: The artifact's schema name.
        version: The version written.
        body: The document's fields (may not use the header's keys).
        default: ``json.dumps``'s fallback for objects JSON cannot hold (e.g. ``str``).
    """
    clash = [k for k in HEADER if k in body]
    if clash:
        raise ValueError(f"{schema} fields may not be named {clash}")
    text = json.dumps({SCHEMA_KEY: schema, VERSION_KEY: version, **body}, indent=2, default=default)
    with atomic_file(file) as tmp:
        tmp.write_text(text)


def folder_file(path: str | Path, name: str) -> Path:
    """``path/name`` for an artifact folder, or ``path`` itself when it is that file."""
    path = Path(path)
    return path if path.name == name and path.is_file() else path / name


def artifact_folder(path: str | Path, name: str) -> Path:
    """The artifact folder of ``path``: itself, or its parent when it is the document ``name``."""
    return folder_file(path, name).parent


@functools.cache
def _validator(cls: type) -> type[pydantic.BaseModel]:
    """A strict pydantic model of dataclass ``cls``'s fields (no coercion: ``"1"`` is no int)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            fields[f.name] = (hints[f.name], pydantic.Field(default_factory=f.default_factory))
        else:
            fields[f.name] = (hints[f.name], ...)
    config = pydantic.ConfigDict(strict=True, arbitrary_types_allowed=True)
    return pydantic.create_model(f"{cls.__name__}Fields", __config__=config, **fields)


class JsonArtifact:
    """Base of artifacts that are one JSON document (a dataclass) in a folder.

    Subclasses are dataclasses and set :attr:`SCHEMA`, :attr:`VERSION` (written),
    :attr:`READS` (read; :data:`LEGACY_VERSION` for files from before the header),
    :attr:`FILE` (the document's name in the folder) and :attr:`WHAT` (for messages). A
    field named ``extra`` receives the document's fields the dataclass does not name, so
    nothing a newer writer of the same version added is lost in a read/write round trip.
    """

    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int] = 2
    READS: ClassVar[tuple[int, ...]] = (LEGACY_VERSION, 2)
    FILE: ClassVar[str]
    WHAT: ClassVar[str]
    ERROR: ClassVar[type[NasforgeError]] = ModelFileError
    #: ``json.dumps``'s fallback on writing (``str`` for documents holding e.g. numpy scalars).
    JSON_DEFAULT: ClassVar[Any] = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any], version: int, file: Path) -> Self:
        """The artifact of a document body (header removed) of ``version``.

        Raises:
            ERROR: A field is missing or of the wrong type (the message names it).
        """
        body = cls.upgrade(dict(body), version)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        known = {k: v for k, v in body.items() if k in names and k != "extra"}
        if "extra" in names:
            known["extra"] = {k: v for k, v in body.items() if k not in names}
        try:
            checked = _validator(cls).model_validate(known)
        except pydantic.ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(p) for p in e["loc"]) or "(document)"
            raise cls.ERROR(f"{file}: {loc}: {e['msg']}") from None
        try:
            return cls(**{name: getattr(checked, name) for name in known})
        except ValueError as err:  # the dataclass's own checks (__post_init__)
            raise cls.ERROR(f"{file}: {_first_line(err)}") from None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Self:
        """The artifact of a document of the current version built in memory (by a stage).

        It goes through JSON first, so it holds exactly what :meth:`write` will write
        (tuples become lists).

        Raises:
            ERROR: A field is missing or of the wrong type (a bug of the writer).
        """
        body = json.loads(json.dumps(dict(doc), default=cls.JSON_DEFAULT))
        return cls.from_body(body, cls.VERSION, Path(f"<new {cls.FILE}>"))

    @classmethod
    def upgrade(cls, body: dict[str, Any], version: int) -> dict[str, Any]:
        """The body of an older version in the current version's fields (default: as is)."""
        return body

    def to_body(self) -> dict[str, Any]:
        """The document's fields (``extra`` spread at the top level)."""
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        extra = body.pop("extra", None) or {}
        return {**extra, **body}

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """Read the artifact in folder ``path`` (or its document file).

        Raises:
            ERROR: Missing, corrupt or truncated document, or a bad field.
            ArtifactVersionError: Another schema or a version this nasforge does not read.
        """
        file = folder_file(path, cls.FILE)
        version, body = read_document(file, cls.SCHEMA, cls.READS, cls.WHAT, cls.ERROR)
        return cls.from_body(body, version, file)

    def write(self, path: str | Path) -> Path:
        """Write the document into folder ``path`` (created) atomically; return the file."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / self.FILE
        write_document(file, self.SCHEMA, self.VERSION, self.to_body(), self.JSON_DEFAULT)
        return file
