"""Faster pattern capture for torchao pt2e's prepare/convert passes.

torchao's prepare/convert/move_exported_model_to_{train,eval} match subgraph patterns that they
first capture with ``torch.export.export(strict=True)``: 108 dynamo traces in convert_pt2e alone
(~25 s idle, ~100 s on a loaded 2-core machine). Non-strict capture yields the identical graph
(checked: same converted graph node by node, identical outputs) at a third of the cost, and the
captures depend only on the pattern code and input shapes, so they are memoized per process.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.fx import GraphModule

_PATTERN_CACHE: dict[Any, GraphModule] = {}


def _freeze(value: Any, tensor_values: bool) -> Any:
    """Hashable key of a pattern ingredient; TypeError where none is safe."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, torch.Tensor):
        key = ("T", tuple(value.shape), str(value.dtype), value.device.type)
        if tensor_values:
            key += (value.detach().cpu().numpy().tobytes(),)
        return key
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v, tensor_values) for v in value)
    code = getattr(value, "__code__", None)
    if code is not None:  # a (possibly nested) function: its code plus what it closes over
        cells = tuple(_freeze(c.cell_contents, True) for c in value.__closure__ or ())
        defaults = _freeze(value.__defaults__ or (), True)
        return ("F", code, cells, defaults)
    if callable(value) and hasattr(value, "__qualname__"):  # builtins, torch ops
        return ("C", getattr(value, "__module__", ""), value.__qualname__, id(value))
    raise TypeError(f"no cache key for {type(value).__name__}")


def _capture_pattern(
    pattern: Callable, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any
) -> GraphModule:
    """Drop-in for torchao's ``_get_aten_graph_module_for_pattern``: non-strict and memoized."""
    import copy

    try:
        fn = getattr(pattern, "fn", pattern)
        key: Any = (
            _freeze(fn, True),
            _freeze(tuple(example_inputs), False),
            is_cuda,
            tuple(sorted((k, _freeze(v, True)) for k, v in kwargs.items())),
        )
        hash(key)
    except TypeError:
        key = None
    if key is not None and key in _PATTERN_CACHE:
        return copy.deepcopy(_PATTERN_CACHE[key])
    if is_cuda:
        example_inputs = tuple(
            x.cuda() if isinstance(x, torch.Tensor) else x for x in example_inputs
        )
    gm = torch.export.export(pattern, example_inputs, kwargs, strict=False).module()
    gm.graph.eliminate_dead_code()
    for node in list(gm.graph.nodes):
        # ep.module() adds copy_ nodes for mutated inputs; patterns do not need them
        if node.op == "call_function" and node.target == torch.ops.aten.copy_.default:
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if key is not None:
        _PATTERN_CACHE[key] = gm
        return copy.deepcopy(gm)
    return gm


@contextlib.contextmanager
def fast_pattern_capture() -> Iterator[None]:
    """Within the block, torchao pt2e captures its rewrite patterns non-strictly, memoized.

    Wrap calls to torchao's ``prepare_*``/``convert_pt2e``/``move_exported_model_to_*`` in it
    (the functions of this module already do).
    """
    from torchao.quantization.pt2e import qat_utils, utils

    saved = (utils._get_aten_graph_module_for_pattern, qat_utils._get_aten_graph_module_for_pattern)
    utils._get_aten_graph_module_for_pattern = _capture_pattern
    qat_utils._get_aten_graph_module_for_pattern = _capture_pattern
    try:
        yield
    finally:
        utils._get_aten_graph_module_for_pattern, qat_utils._get_aten_graph_module_for_pattern = (
            saved
        )


def with_fast_capture(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``func`` inside :func:`fast_pattern_capture`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with fast_pattern_capture():
            return func(*args, **kwargs)

    return wrapper
