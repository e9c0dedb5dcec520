"""Architecture transformations before export: Conv-BN folding.

What was measured (torch 2.13, onnxscript optimizer, ONNX Runtime 1.32, OpenVINO 2026.4):

* FP32: ``torch.onnx.export(dynamo=True)`` runs onnxscript's rewrite rules, whose
  ``_fuse_batchnorm`` rule folds every BatchNormalization that follows a Conv or Gemm into it.
  The exported graph keeps only BNs that follow a *sum* (NB201's head BN), which no conv
  precedes; both runtimes execute those as a fused scale-shift. Folding in torch first gives the
  same graph, so :func:`fold_conv_bn` is not needed for export; it exists for torch-side
  measurement (eager latency, MAC counts without BN) and for runtimes fed a torch module.
* INT8: the pt2e QAT flow simulates the fold during training and ``convert_pt2e`` folds BN into
  the conv weights before quantizing them (see :mod:`nasforge.compress.qat`); folding afterwards
  would change the weights that the quantization grid was learned for, so never fold before QAT.
* Reparameterization: a NAS-Bench-201 cell has no parallel branches over the *same* input (each
  edge joins a distinct pair of nodes), so there is nothing RepVGG-style to merge; none is done.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_conv_bn(model: nn.Module) -> tuple[nn.Module, int]:
    """Return an eval-mode copy of ``model`` with Conv -> BatchNorm pairs folded into the Conv.

    Pairs are found inside ``nn.Sequential`` containers (how ReLU-Conv-BN ops and stems are
    built); the BN is replaced by ``nn.Identity`` so module names and the forward stay valid.

    Args:
        model: the float model (left unchanged).

    Returns:
        The folded copy and the number of BNs folded.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules.keys())
        for a, b in zip(keys, keys[1:], strict=False):
            conv, bn = module._modules[a], module._modules[b]
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, _BatchNorm)
                and bn.track_running_stats
                and conv.out_channels == bn.num_features
            ):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
                count += 1
    return folded, count


def count_batchnorm(model: nn.Module) -> int:
    """Number of BatchNorm layers that still compute something (not replaced by Identity)."""
    return sum(isinstance(m, _BatchNorm) for m in model.modules())
