"""DVC content hashes and pushes for stage outputs, through DVC's own data layer.

The hash is the one ``dvc add``/``dvc.lock`` records (``md5`` of the file, or ``<md5>.dir`` for a
folder), so a model tagged on an MLflow run can be found in any DVC remote and fetched with
``dvc pull`` / ``dvc get``. Pushing writes to the remote's content-addressed layout
(``files/md5/xx/yyyy``) exactly as ``dvc push`` does.
"""

from __future__ import annotations

from pathlib import Path

from dvc_data.hashfile.build import build
from dvc_data.hashfile.db.local import LocalHashFileDB
from dvc_data.hashfile.transfer import transfer
from dvc_objects.fs.local import LocalFileSystem

from nasforge.errors import TrackingError


def _odb(remote: Path) -> LocalHashFileDB:
    return LocalHashFileDB(LocalFileSystem(), str(remote / "files" / "md5"))


def dvc_hash(path: str | Path) -> str:
    """DVC's md5 of a file or folder (``<md5>.dir`` for folders)."""
    fs = LocalFileSystem()
    scratch = LocalHashFileDB(fs, str(Path(path).parent / ".dvc-hash-scratch"))
    _, _, obj = build(scratch, str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def push(path: str | Path, remote: str | Path) -> str:
    """Push a file or folder to a local DVC remote; return its DVC hash.

    Raises:
        TrackingError: The remote folder cannot be written.
    """
    remote = Path(remote)
    fs = LocalFileSystem()
    try:
        remote.mkdir(parents=True, exist_ok=True)
        odb = _odb(remote)
        staging, _, obj = build(odb, str(path), fs, "md5")
        result = transfer(staging, odb, {obj.hash_info}, hardlink=False, shallow=False)
    except OSError as err:
        raise TrackingError(f"cannot push {path} to DVC remote {remote}: {err}") from None
    if result.failed:
        raise TrackingError(
            f"DVC push of {path} to {remote} failed for {len(result.failed)} object(s)"
        )
    return obj.hash_info.value
