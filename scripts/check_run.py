"""Check the main job's result as a new user would: ``runs/latest/summary.json`` exists and
every target of the params file was benchmarked and has a registered model.

Used by ``.ci/run`` after ``make run``; exits non-zero with one line naming what is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def main(params_path: str = "params.yaml", runs_dir: str = "runs") -> int:
    """Return 0 when the last run covered every target, else print why and return 1."""
    targets = yaml.safe_load(Path(params_path).read_text()).get("targets") or []
    summary_path = Path(runs_dir) / "latest" / "summary.json"
    if not summary_path.is_file():
        print(f"check-run: {summary_path} is missing: the main job did not finish", flush=True)
        return 1
    summary = json.loads(summary_path.read_text())
    problems = []
    for target in targets:
        s = summary.get("targets", {}).get(target)
        if s is None:
            problems.append(f"{target}: not in the summary")
        elif s.get("accuracy") is None or s.get("latency_p50_ms") is None:
            problems.append(f"{target}: not benchmarked ({s.get('reason')})")
        elif not s.get("version"):
            problems.append(f"{target}: no registered model ({s.get('reason')})")
    if problems:
        print("check-run: " + "; ".join(problems), flush=True)
        return 1
    for target in targets:
        s = summary["targets"][target]
        print(
            f"check-run: {target}: v{s['version']} acc {s['accuracy']:.4f} "
            f"p50@1 {s['latency_p50_ms']:.3f} ms promoted={s['promoted']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
