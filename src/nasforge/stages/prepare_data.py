"""prepare-data: load a dataset, split it deterministically, write one versioned artifact."""

from __future__ import annotations

from pathlib import Path

from nasforge.artifacts.dataset import META_JSON
from nasforge.config import Params
from nasforge.data.prepared import save_prepared, split_raw
from nasforge.data.sources import load_source
from nasforge.stages import NO_CONTEXT, StageContext, StageResult


def run(params: Params, output: Path, ctx: StageContext = NO_CONTEXT) -> StageResult:
    """Load ``params.data.source`` and write ``dataset.npz`` + ``meta.json`` to ``output``."""
    p = params.data
    raw = load_source(p.source, p.image_size, p.max_per_class)
    arrays = split_raw(raw, p.val_fraction, p.test_fraction, params.run.seed)
    meta = save_prepared(arrays, raw.classes, p.source, params.run.seed, output)
    print(
        f"  {p.source}: {meta['counts']} images of shape {meta['input_shape']}, "
        f"{len(meta['classes'])} classes",
        flush=True,
    )
    return StageResult(
        metrics={f"n_{k}": v for k, v in meta["counts"].items()},
        tags={"dataset.sha256": meta["sha256"], "dataset.source": p.source},
        model_dir=output,
        artifacts=[output / META_JSON],
    )
