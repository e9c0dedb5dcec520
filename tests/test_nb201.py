"""NAS-Bench-201 cell encoding: arch_str, JSON, indices, and the official arch_idx table."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from nasforge.errors import ConfigError, DataError
from nasforge.space import nb201
from nasforge.space.nb201 import OPS, CellSpec, Nb201IndexTable

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NASFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
TABLE = SHARED / "nb201" / "nb201_dev.csv"
needs_table = pytest.mark.skipif(
    not TABLE.is_file(), reason=f"NB201 table not found at {TABLE} (set NASFORGE_SHARED_DATA)"
)

EXAMPLE = (
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
    "+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
)


def test_arch_str_round_trip_example() -> None:
    spec = CellSpec.from_arch_str(EXAMPLE)
    assert spec.ops == (
        "nor_conv_3x3",
        "nor_conv_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "nor_conv_3x3",
        "skip_connect",
    )
    assert spec.arch_str == EXAMPLE


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "|none~0|+|none~0|none~1|",  # two nodes only
        "|none~0|+|none~0|none~1|+|none~0|none~1|",  # node 3 misses an input
        "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|",  # wrong source index
        "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # unknown op
        "none~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # missing bar
        "|none0|+|none~0|none~1|+|none~0|none~1|none~2|",  # missing tilde
    ],
)
def test_bad_arch_str_raises_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        CellSpec.from_arch_str(bad)


def test_bad_ops_rejected() -> None:
    with pytest.raises(ConfigError, match="6 ops"):
        CellSpec(("none",) * 5)
    with pytest.raises(ConfigError, match="unknown op"):
        CellSpec(("none",) * 5 + ("conv5x5",))


def test_json_round_trip_and_consistency_check() -> None:
    spec = CellSpec.from_arch_str(EXAMPLE)
    assert CellSpec.from_json(spec.to_json()) == spec
    assert CellSpec.from_json(json.dumps({"arch_str": EXAMPLE})) == spec
    with pytest.raises(ConfigError, match="disagrees"):
        CellSpec.from_json(json.dumps({"ops": ["none"] * 6, "arch_str": EXAMPLE}))
    with pytest.raises(ConfigError, match="not valid JSON"):
        CellSpec.from_json("{")


def test_canonical_index_is_a_bijection() -> None:
    seen = set()
    for i in range(nb201.NUM_ARCHS):
        spec = CellSpec.from_index(i)
        assert spec.to_index() == i
        seen.add(spec)
    assert len(seen) == 5**6
    assert CellSpec.from_index(0).ops == ("none",) * 6
    assert CellSpec.from_index(1).ops == ("none",) * 5 + ("skip_connect",)
    with pytest.raises(ConfigError):
        CellSpec.from_index(5**6)


def test_params_round_trip() -> None:
    spec = CellSpec.from_arch_str(EXAMPLE)
    assert CellSpec.from_params(spec.to_params()) == spec
    assert set(nb201.search_space()) == set(nb201.PARAM_NAMES)
    assert all(tuple(c) == OPS for c in nb201.search_space().values())
    with pytest.raises(ConfigError, match="missing"):
        CellSpec.from_params({"edge0": "none"})


def test_active_edges() -> None:
    # Only edge (3,0) is live: that edge alone is active.
    only_30 = CellSpec(("none", "none", "none", "nor_conv_3x3", "none", "none"))
    assert nb201.active_edges(only_30) == (False, False, False, True, False, False)
    # Edge (1,0) live but node 1 never reaches the output: inactive.
    dead = CellSpec(("nor_conv_3x3", "none", "none", "skip_connect", "none", "none"))
    assert nb201.active_edges(dead) == (False, False, False, True, False, False)
    assert all(nb201.active_edges(CellSpec.from_arch_str(EXAMPLE)))


@needs_table
def test_official_index_round_trip_against_table() -> None:
    table = Nb201IndexTable.from_csv(TABLE)
    assert len(table) == 5**6
    with TABLE.open(newline="") as fh:
        for row in csv.DictReader(fh):
            spec = CellSpec.from_arch_str(row["arch_str"])
            assert spec.arch_str == row["arch_str"]  # exact string round trip
            assert table.arch_idx(spec) == int(row["arch_idx"])
            assert table.spec(int(row["arch_idx"])) == spec
    with pytest.raises(ConfigError):
        table.spec(10**6)


def test_index_table_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        Nb201IndexTable.from_csv(tmp_path / "missing.csv")
    no_cols = tmp_path / "a.csv"
    no_cols.write_text("idx,arch\n0,x\n")
    with pytest.raises(DataError, match="arch_idx"):
        Nb201IndexTable.from_csv(no_cols)
    bad = tmp_path / "b.csv"
    bad.write_text(f"arch_idx,arch_str\n0,{EXAMPLE}\n1,|bad|\n")
    with pytest.raises(DataError, match=":3:"):
        Nb201IndexTable.from_csv(bad)
    dup = tmp_path / "c.csv"
    dup.write_text(f"arch_idx,arch_str\n0,{EXAMPLE}\n1,{EXAMPLE}\n")
    with pytest.raises(DataError, match="share"):
        Nb201IndexTable.from_csv(dup)
