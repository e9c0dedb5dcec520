"""Which convolutions of a cell network keep a float output in its deployed INT8 graph.

The pipeline's INT8 models quantize a conv's output only where one op (other than its
activation) reads it (see :func:`nasforge.bench.timing_export._match_deployed_layout`, which
mirrors the torchao pt2e export). A conv whose output fans out to two or more readers stays a
float ``DequantizeLinear -> Conv`` in the graph: ONNX Runtime then runs it as a float kernel with
layout transposes around it instead of a fused ``QLinearConv``. In the NAS-Bench-201 cell that
happens to a node fed by a single conv edge when the node is read by two or more ops, e.g. two
``skip_connect`` edges into two node sums. Measured here (ONNX Runtime 1.32, INT8, batch 32):
networks with three such convs ran 1.6-1.9x their block sum, against 1.0-1.1x for networks
without; counting them as blocks of their own took the INT8 cell predictor from 84% to 94-96%
of subnets within +-10%.

Which tensors have two readers depends on the common subexpressions the exporter and runtime
eliminate, so the network is evaluated symbolically: every tensor is a hash-consed expression
(parameter-free ops on the same input are one tensor, convs never are: each has its own weights;
node sums are left-associative in edge order, so ``a + b + c`` shares ``a + b`` with a node
that sums ``a + b``), and a conv is float when its expression has two or more distinct readers.
``tests/test_hardware_predictor.py`` checks the rule against the graph ONNX Runtime actually
optimizes, on random cells.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable

from nasforge.space.cell import computed_edges
from nasforge.space.nb201 import EDGES, N_NODES, CellSpec


class _ExprGraph:
    """Hash-consed tensors and the distinct tensors that read each one."""

    def __init__(self) -> None:
        self.ids: dict[Hashable, int] = {}
        self.readers: defaultdict[int, set[int]] = defaultdict(set)

    def tensor(self, key: Hashable, inputs: tuple[int, ...] = ()) -> int:
        if key not in self.ids:
            self.ids[key] = len(self.ids)
            for i in inputs:
                self.readers[i].add(self.ids[key])
        return self.ids[key]


def float_output_convs(spec: CellSpec, stages: int = 3, cells_per_stage: int = 1) -> Counter:
    """Cell convolutions whose output stays float in the INT8 graph of a cell network.

    Args:
        spec: The cell.
        stages: Stages of the network (a residual reduction block between two).
        cells_per_stage: Cells per stage.

    Returns:
        ``Counter({(op, stage): n})`` over the whole network, ``op`` one of the conv ops.
    """
    g = _ExprGraph()
    serial = iter(range(1 << 30))  # weighted ops are never common subexpressions

    def weighted(name: str, src: int) -> int:
        return g.tensor((name, next(serial)), (src,))

    x = weighted("stem", g.tensor("input"))
    live = computed_edges(spec)
    convs: list[tuple[int, str, int]] = []
    for stage in range(stages):
        if stage > 0:  # ResidualReduction: conv_b(conv_a(x)) + shortcut(x)
            a = weighted("conv_a", g.tensor(("relu", x), (x,)))
            b = weighted("conv_b", g.tensor(("relu", a), (a,)))
            short = weighted("shortcut", g.tensor(("pool2", x), (x,)))
            x = g.tensor(("add", b, short), (b, short))
        for _ in range(cells_per_stage):
            nodes: list[int | None] = [x]
            for node in range(1, N_NODES):
                terms = []
                for k, (dst, src) in enumerate(EDGES):
                    if dst != node or not live[k]:
                        continue
                    value, op = nodes[src], spec.ops[k]
                    assert value is not None  # a live edge reads a node that exists
                    if op == "skip_connect":
                        terms.append(value)
                    elif op == "avg_pool_3x3":
                        terms.append(g.tensor(("pool", value), (value,)))
                    else:
                        conv = weighted(op, g.tensor(("relu", value), (value,)))
                        convs.append((conv, op, stage))
                        terms.append(conv)
                if not terms:
                    read = any(live[k] for k, (_d, s) in enumerate(EDGES) if s == node)
                    last = node == N_NODES - 1
                    nodes.append(g.tensor(("zero", x), (x,)) if read or last else None)
                    continue
                total = terms[0]
                for t in terms[1:]:
                    total = g.tensor(("add", total, t), (total, t))
                nodes.append(total)
            x = nodes[-1]
    g.tensor(("head", x), (x,))
    return Counter((op, stage) for conv, op, stage in convs if len(g.readers[conv]) >= 2)
