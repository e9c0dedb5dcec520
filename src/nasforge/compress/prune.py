"""Structured channel pruning (Torch-Pruning), unstructured sparsity, and pruned-model files.

Structured pruning removes whole channels, so the pruned network is a smaller dense network
that runs faster everywhere. Torch-Pruning's dependency graph finds the channels that must go
together: in a NAS-Bench-201 cell every node *sums* its inputs (identity skips included), so all
tensors joined by a sum share one set of channel indices, and a BatchNorm follows its conv.

A pruned model no longer matches the architecture its spec describes, so it is saved as the
``pruned`` variant of the model artifact (:mod:`nasforge.artifacts.model`: safetensors weights
plus the per-layer shapes in ``model.json``); :func:`load_pruned_weights` rebuilds it from a
freshly built (unpruned) network by resizing its Conv/BN/Linear layers first. No pickle is
involved anywhere.

Unstructured (element-wise) sparsity gives no speedup in ONNX Runtime or OpenVINO on CPU; it is
offered for size only and reported as compressed bytes.
"""

from __future__ import annotations

import copy
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from nasforge import progress
from nasforge.artifacts.model import MODEL_JSON, WEIGHTS, ModelArtifact
from nasforge.artifacts.model import layer_shapes as layer_shapes
from nasforge.errors import ConfigError, ModelFileError

IMPORTANCES = ("magnitude", "taylor")
#: The files of a pruned model: those of every model artifact.
WEIGHTS_FILE = WEIGHTS
META_FILE = MODEL_JSON


# --- measuring ----------------------------------------------------------------------------------


def count_macs_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Return (multiply-accumulates, parameters) of ``model`` for one batch of ``example_input``.

    MACs are per sample (the example is cut to batch 1).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example_input[:1])
    finally:
        model.train(was_training)
    return int(macs), int(params)


# --- structured pruning -------------------------------------------------------------------------


def _importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ConfigError(f"prune importance must be one of {', '.join(IMPORTANCES)}, not {name!r}")


def default_ignored_layers(model: nn.Module) -> list[nn.Module]:
    """The classifier: the last ``nn.Linear`` (its outputs are the classes, never pruned)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _resolve_ignored(
    model: nn.Module, ignored: Sequence[nn.Module | str] | None
) -> list[nn.Module]:
    if ignored is None:
        return default_ignored_layers(model)
    modules = dict(model.named_modules())
    out: list[nn.Module] = []
    for item in ignored:
        if isinstance(item, str):
            if item not in modules:
                raise ConfigError(f"ignored layer {item!r} is not a module of the model")
            out.append(modules[item])
        else:
            out.append(item)
    return out


def _make_pruner(
    model: nn.Module,
    example_input: torch.Tensor,
    importance: str,
    channel_ratio: float,
    steps: int,
    ignored: list[nn.Module],
    round_to: int | None,
) -> tp.pruner.BasePruner:
    return tp.pruner.BasePruner(
        model,
        example_input,
        importance=_importance(importance),
        pruning_ratio=channel_ratio,
        iterative_steps=steps,
        ignored_layers=ignored,
        round_to=round_to,
        global_pruning=False,
    )


def channel_ratio_for_flops(
    model: nn.Module,
    example_input: torch.Tensor,
    target_flops_ratio: float,
    ignored_layers: Sequence[nn.Module | str] | None = None,
    round_to: int | None = None,
    tolerance: float = 0.01,
    max_iter: int = 12,
) -> float:
    """Find the per-layer channel pruning ratio that keeps ``target_flops_ratio`` of the MACs.

    Bisection over one-shot prunes of copies; with per-layer (non-global) pruning the MACs depend
    on how many channels each group loses, not on which, so magnitude importance is used here
    whatever criterion the real prune uses.
    """
    if not 0.0 < target_flops_ratio < 1.0:
        raise ConfigError(f"target_flops_ratio must be in (0, 1), got {target_flops_ratio}")
    base_macs, _ = count_macs_params(model, example_input)
    names = {id(m): n for n, m in model.named_modules()}
    ignored_names = [names[id(m)] for m in _resolve_ignored(model, ignored_layers)]
    lo, hi, best = 0.0, 0.95, 0.95
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model).eval()
        ignored = _resolve_ignored(trial, ignored_names)
        # no torch.no_grad(): the dependency graph is traced through autograd
        _make_pruner(trial, example_input, "magnitude", mid, 1, ignored, round_to).step()
        ratio = count_macs_params(trial, example_input)[0] / base_macs
        if ratio > target_flops_ratio:
            lo = mid
        else:
            hi = best = mid
        if abs(ratio - target_flops_ratio) <= tolerance:
            return mid
    return best


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    target_flops_ratio: float | None = None,
    channel_ratio: float | None = None,
    importance: str = "magnitude",
    steps: int = 1,
    finetune: Callable[[nn.Module], None] | None = None,
    ignored_layers: Sequence[nn.Module | str] | None = None,
    grad_fn: Callable[[nn.Module], None] | None = None,
    round_to: int | None = None,
    checkpoint_dir: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune whole channels (physically) in ``steps`` steps, fine-tuning after each.

    Args:
        model: the trained float model; pruned in place and returned.
        example_input: a batch of inputs (for the dependency graph and MAC counts).
        target_flops_ratio: MACs to keep, as a fraction of the original (0.5 = half the FLOPs);
            the channel ratio is searched to meet it. Exclusive with ``channel_ratio``.
        channel_ratio: fraction of the channels of every prunable layer to remove.
        importance: ``"magnitude"`` (L2 of the group's weights) or ``"taylor"`` (first-order
            Taylor: |weight x gradient|; needs ``grad_fn``).
        steps: the gradual schedule: the ratio is reached in this many equal steps.
        finetune: called with the model after every step (e.g. one epoch of training; it
            should leave the model in eval mode or any mode, this function does not care).
        ignored_layers: modules or module names never pruned (default: the classifier).
        grad_fn: for Taylor importance, called before every step to compute gradients
            (e.g. ``loss.backward()`` on a few batches); gradients are zeroed before.
        round_to: keep channel counts multiples of this (SIMD-friendly), None for any count.
        checkpoint_dir: make the schedule resumable: the weights after each step's fine-tuning
            are saved here, and each step's fine-tuning runs with ``step-<k>/`` as the current
            work folder (:func:`nasforge.checkpoint.current_work_dir`), so its own epoch
            checkpoints land there. A rerun replays the finished steps (the same channels go,
            since the weights they are chosen from are restored) without fine-tuning them again.

    Returns:
        The pruned model and a report: ``macs_before``, ``macs_after``, ``params_before``,
        ``params_after``, ``flops_ratio``, ``params_ratio``, ``channel_ratio``, ``importance``,
        ``steps`` (per-step MACs/params).

    Raises:
        ConfigError: bad ratios, importance, or Taylor without ``grad_fn``.
    """
    if (target_flops_ratio is None) == (channel_ratio is None):
        raise ConfigError("give exactly one of target_flops_ratio and channel_ratio")
    if steps < 1:
        raise ConfigError(f"prune steps must be >= 1, got {steps}")
    imp = _importance(importance)  # validates the name
    del imp
    if importance == "taylor" and grad_fn is None:
        raise ConfigError("Taylor importance needs grad_fn (gradients of the loss)")
    if channel_ratio is not None and not 0.0 < channel_ratio < 1.0:
        raise ConfigError(f"channel_ratio must be in (0, 1), got {channel_ratio}")
    example_input = example_input.detach()
    macs0, params0 = count_macs_params(model, example_input)
    if target_flops_ratio is not None:
        channel_ratio = channel_ratio_for_flops(
            model, example_input, target_flops_ratio, ignored_layers, round_to
        )
    assert channel_ratio is not None
    ignored = _resolve_ignored(model, ignored_layers)
    was_training = model.training
    model.eval()  # tracing the dependency graph runs a forward: do not touch BN statistics
    pruner = _make_pruner(model, example_input, importance, channel_ratio, steps, ignored, round_to)
    history: list[dict[str, int]] = []
    for step in range(steps):
        if importance == "taylor":
            model.zero_grad(set_to_none=True)
            assert grad_fn is not None
            grad_fn(model)
        pruner.step()
        model.zero_grad(set_to_none=True)
        macs, params = count_macs_params(model, example_input)
        history.append({"step": step + 1, "macs": macs, "params": params})
        if finetune is not None:
            _finetune_step(model, finetune, checkpoint_dir, step + 1)
        progress.step("prune step", step + 1, steps, params=params)
    model.train(was_training)
    macs1, params1 = count_macs_params(model, example_input)
    report = {
        "macs_before": macs0,
        "macs_after": macs1,
        "params_before": params0,
        "params_after": params1,
        "flops_ratio": macs1 / macs0,
        "params_ratio": params1 / params0,
        "channel_ratio": channel_ratio,
        "target_flops_ratio": target_flops_ratio,
        "importance": importance,
        "steps": history,
    }
    return model, report


def _finetune_step(
    model: nn.Module,
    finetune: Callable[[nn.Module], None],
    checkpoint_dir: Path | None,
    step: int,
) -> None:
    """Fine-tune after step ``step``, or restore its result when a killed run finished it."""
    if checkpoint_dir is None:
        finetune(model)
        return
    from nasforge.checkpoint import (
        atomic_torch_save,
        reset_current_work_dir,
        set_current_work_dir,
    )

    done = Path(checkpoint_dir) / f"step-{step}.pt"
    if done.is_file():
        model.load_state_dict(torch.load(done, weights_only=True))
        print(f"  resumed prune step {step} (fine-tuned before)", flush=True)
        return
    work = Path(checkpoint_dir) / f"step-{step}"
    work.mkdir(parents=True, exist_ok=True)
    token = set_current_work_dir(work)
    try:
        finetune(model)
    finally:
        reset_current_work_dir(token)
    atomic_torch_save(model.state_dict(), done)


# --- unstructured sparsity ----------------------------------------------------------------------


def sparsify_unstructured(
    model: nn.Module,
    sparsity: float,
    ignored_layers: Sequence[nn.Module | str] | None = None,
) -> dict[str, Any]:
    """Zero the smallest-magnitude weights of every Conv/Linear (per layer), in place.

    No runtime here runs sparse kernels on CPU, so this buys size only: the report gives the
    dense and the zlib-compressed size of the weights, not a speed.

    Returns:
        ``sparsity`` (achieved, over the sparsified weights), ``nonzero``, ``total``,
        ``dense_bytes`` and ``compressed_bytes`` (whole state dict, float32).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    ignored = {id(m) for m in _resolve_ignored(model, ignored_layers)}
    zeros = total = 0
    with torch.no_grad():
        for module in model.modules():
            if id(module) in ignored or not isinstance(module, (_ConvNd, nn.Linear)):
                continue
            w = module.weight
            k = int(w.numel() * sparsity)
            if k > 0:
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_((w.abs() > threshold).to(w.dtype))
            zeros += int((w == 0).sum())
            total += w.numel()
    dense, compressed = weights_size_bytes(model)
    return {
        "sparsity": zeros / total if total else 0.0,
        "nonzero": total - zeros,
        "total": total,
        "dense_bytes": dense,
        "compressed_bytes": compressed,
    }


def weights_size_bytes(model: nn.Module) -> tuple[int, int]:
    """Return (raw, zlib-compressed) bytes of the model's float tensors."""
    raw = b"".join(
        t.detach().cpu().contiguous().numpy().tobytes() for t in model.state_dict().values()
    )
    return len(raw), len(zlib.compress(raw, 6))


# --- pruned-model files -------------------------------------------------------------------------


def save_model(model: nn.Module, path_dir: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    """Save a pruned model as the ``pruned`` variant of the model artifact (folder replaced whole).

    Args:
        model: the model (its layer sizes are recorded).
        path_dir: the folder to write (replaced as a whole if it exists).
        meta: JSON-serializable metadata (architecture spec, metrics, prune report, ...).

    Returns:
        The folder.
    """
    return ModelArtifact.from_module(model, meta, pruned=True).write(path_dir)


def load_model_files(
    path_dir: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict[str, Any]]]:
    """Read a pruned model folder (this format, or a ``nasforge-pruned-v1`` one).

    Returns:
        ``(state_dict, meta, shapes)``; ``shapes`` is empty when the folder does not record
        them (they are then inferred from the weights by :func:`load_pruned_weights`).

    Raises:
        ModelFileError: missing, truncated or corrupt files.
        ArtifactVersionError: a version this nasforge does not read.
    """
    art = ModelArtifact.read(path_dir)
    return art.state, art.meta, art.layer_shapes or {}


def _resize_conv(m: _ConvNd, weight: torch.Tensor, groups: int | None) -> None:
    out_ch = weight.shape[0]
    if groups is None:  # infer: depthwise stays depthwise, other groupings are kept
        groups = out_ch if m.groups == m.in_channels == m.out_channels else m.groups
    m.out_channels, m.groups, m.in_channels = out_ch, groups, weight.shape[1] * groups
    m.weight = nn.Parameter(torch.empty_like(weight))
    if m.bias is not None:
        m.bias = nn.Parameter(torch.empty(out_ch, dtype=weight.dtype))


def _resize_bn(m: _BatchNorm, n: int) -> None:
    m.num_features = n
    if m.affine:
        m.weight = nn.Parameter(torch.empty(n))
        m.bias = nn.Parameter(torch.empty(n))
    if m.track_running_stats:
        m.running_mean = torch.zeros(n)
        m.running_var = torch.ones(n)


def load_pruned_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    shapes: dict[str, dict[str, Any]] | None = None,
) -> nn.Module:
    """Resize ``model``'s Conv/BN/Linear layers to the saved shapes, then load the weights.

    Args:
        model: the network rebuilt from its spec (unpruned shapes); modified in place.
        state_dict: weights from :func:`load_model_files` (or any state dict of the pruned net).
        shapes: the saved per-layer shapes (exact groups for grouped convs); inferred from the
            weights when None.

    Returns:
        ``model``, now with the pruned shapes and weights.

    Raises:
        ModelFileError: the weights do not fit the architecture (other layers differ).
    """
    shapes = shapes or {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state_dict.get(prefix + "weight")
        if isinstance(m, _ConvNd) and w is not None and w.shape != m.weight.shape:
            _resize_conv(m, w, shapes.get(name, {}).get("groups"))
        elif isinstance(m, nn.Linear) and w is not None and w.shape != m.weight.shape:
            m.out_features, m.in_features = w.shape
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w.shape[0], dtype=w.dtype))
        elif isinstance(m, _BatchNorm):
            ref = w if w is not None else state_dict.get(prefix + "running_mean")
            if ref is not None and ref.shape[0] != m.num_features:
                _resize_bn(m, ref.shape[0])
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"saved weights do not fit the architecture ({first})") from exc
    return model
