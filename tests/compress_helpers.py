"""Tiny models and data shared by the compression/export tests (test_qat, test_prune, test_export).

``TinyCellNet`` has the structure features of nasforge's NB201 cell network that matter to
quantization, pruning and export: ReLU-Conv-BN ops, a node that sums an identity skip, an
average pool and a conv, a ResNet-style reduction with a pooled 1x1 shortcut, and a
BN-ReLU-GAP-Linear head.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


class ReLUConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TinyCell(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.e1 = ReLUConvBN(c, c, 3)
        self.e2 = ReLUConvBN(c, c, 1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n1 = self.e1(x) + x  # conv + identity
        return self.e2(n1) + self.pool(x) + n1  # conv + avg-pool + identity


class TinyReduction(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.a = ReLUConvBN(c_in, c_out, 3, 2)
        self.b = ReLUConvBN(c_out, c_out, 3)
        self.short = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.short(x)


class TinyCellNet(nn.Module):
    def __init__(self, in_ch: int = 1, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.cell1 = TinyCell(c)
        self.red = TinyReduction(c, 2 * c)
        self.cell2 = TinyCell(2 * c)
        self.head = nn.Sequential(nn.BatchNorm2d(2 * c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cell2(self.red(self.cell1(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as NCHW float32 in [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 4, lr: float = 3e-3, seed: int = 0
) -> nn.Module:
    """A few epochs of Adam; enough for ~95% on digits with TinyCellNet."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(fn, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((fn(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@functools.cache
def trained_tiny() -> TinyCellNet:
    """A TinyCellNet trained on digits (cached: several tests share it; copy before mutating)."""
    x, y, _, _ = digits()
    torch.manual_seed(0)
    return train(TinyCellNet(), x[:1000], y[:1000], epochs=3)


@functools.cache
def qat_bundle():
    """(float model, QuantResult of 1 epoch of QAT) on digits; cached for the whole session."""
    from nasforge.compress.qat import quantize_qat

    x, y, _, _ = digits()
    model = trained_tiny()
    result = quantize_qat(model, torch.from_numpy(x[:8]), (x[:512], y[:512]), epochs=1, lr=1e-3)
    return model, result
