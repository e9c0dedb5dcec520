"""Space coverage: every connected NB201 cell and 2,000 macro specs through the compression chain.

Every connected cell of the NAS-Bench-201 space (15,284) and ``--macro`` specs drawn uniformly
from the configured macro space go through build -> prune stage -> load -> forward, and
``--chain`` of each (drawn uniformly among them) on through the qat and export stages to one
inference in ONNX Runtime and OpenVINO, with shapes, channel counts and parity checked. The
per-architecture logic is :mod:`nasforge.space_coverage` (the same as
``tests/test_space_coverage.py``); prune settings (channel ratio, importance, steps,
fine-tuning) vary per architecture over what ``params.prune`` allows.

Resumable, across sessions too (the checkpoint is committed): every finished case is appended to ``<work>/checkpoint.jsonl``; a rerun skips the
architectures already there (same plan: same seed, counts, shapes and params, else it refuses
and names the difference). ``benchmarks/results/space_coverage.{json,md}`` are rewritten every
minute and at the end, from the checkpoint, with ``finished`` false until every planned case is
done; per space: ``tried`` (prune -> forward), ``chain_tried`` (whole chain), ``passed``,
``failed`` (``{arch, stage, error, prune}``) and ``seconds`` (summed case time).

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_space_coverage.py [--workers 2] [--macro 2000]
        [--chain 500] [--cell-channels 16] [--work benchmarks/results/space_coverage_run]
    .venv/bin/python benchmarks/bench_space_coverage.py --macro 6 --chain 2 --cells 6 \\
        --work /tmp/bcov-smoke --out /tmp/bcov-smoke     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from nasforge import space_coverage as sc
from nasforge.bench.sysinfo import system_info
from nasforge.config import params_from_dict

REPO = Path(__file__).resolve().parents[1]
# In the repo, committed: the checkpoint resumes across sessions (data/ and cases/ are ignored).
DEFAULT_WORK = REPO / "benchmarks" / "results" / "space_coverage_run"
CHECKPOINT = "checkpoint.jsonl"
PLAN = "plan.json"
SESSIONS = "sessions.jsonl"
SUPERSEDED = "superseded.jsonl"
WRITE_EVERY_S = 60.0
PRINT_EVERY_S = 30.0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: that case runs again
            continue
    return out


def _key(space: str, arch: str) -> str:
    return f"{space}:{arch}"


def plan_cases(args: argparse.Namespace, params: Any) -> list[sc.Case]:
    """Both spaces' cases, interleaved in a seeded random order (partial runs stay uniform)."""
    cases = sc.sample_cases("cell", args.cells, args.chain, args.seed, params)
    cases += sc.sample_cases("macro", args.macro, args.chain, args.seed, params)
    random.Random(f"{args.seed}:order").shuffle(cases)
    return cases


def _md(doc: dict[str, Any]) -> str:
    state = "finished" if doc["finished"] else "NOT finished (resumes from the checkpoint)"
    s = doc["system"]
    lines = [
        "# Space coverage: architectures through prune -> QAT -> export -> runtimes",
        "",
        f"State: **{state}**; updated {doc['updated']}; wall time so far "
        f"{doc['wall_seconds'] / 3600:.2f} h over {doc['sessions']} session(s), "
        f"{doc['workers']} worker process(es) x {doc['threads']} thread.",
        "",
        f"Machine: {s['cpu_model']}, {s['logical_cores']} logical cores, ISA "
        f"{' '.join(s['isa_flags'])}; torch {s['versions']['torch']}, onnxruntime "
        f"{s['versions']['onnxruntime']}, openvino {s['versions']['openvino']}; "
        f"load average {s['load_avg_1m']} (shared machine).",
        "",
        f"Cell shape: {doc['settings']['cell_shape']}, 8x8 digits (1 channel, 10 classes); "
        f"QAT {doc['settings']['qat']}; prune settings drawn per architecture "
        "(channel_ratio U(0.02, 0.98), importance magnitude|taylor, steps 1-4, "
        "finetune_epochs 0|1).",
        "",
        "| space | planned (prune / chain) | tried | chain_tried | passed | chain_passed "
        "| failed | case seconds | median s per chain step (qat / export) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for space, r in doc["spaces"].items():
        p = doc["planned"][space]
        med = r.get("median_seconds_per_step", {})
        lines.append(
            f"| {space} | {p['tried']} / {p['chain_tried']} | {r['tried']} | {r['chain_tried']} "
            f"| {r['passed']} | {r['chain_passed']} | {len(r['failed'])} | {r['seconds']:.0f} "
            f"| {med.get('qat', '-')} / {med.get('export', '-')} |"
        )
    t = doc["settings"]["thresholds"]
    lines += [
        "",
        f"Parity (export stage, test split of 60 images): FP32 needs top-1 agreement >= "
        f"{t['fp32_min_top1']} and max |diff| <= {t['fp32_max_abs_diff']:g}; INT8 needs top-1 "
        f"agreement >= {t['int8_min_top1']} with the converted torch model, or max |diff| <= "
        f"{t.get('int8_max_abs_diff', 'n/a')}, or max |diff| <= {t.get('int8_rel_quant_error', 'n/a')} x "
        "the converted torch model's own max |diff| from the FP32 model (untrained networks have "
        "near-tied logits; the relative rule was added on 2026-12-02, see below).",
        "",
        "| space | runtime/precision | archs | min top-1 | mean top-1 | max abs diff |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for space, r in doc["spaces"].items():
        for k, v in sorted(r.get("parity", {}).items()):
            lines.append(
                f"| {space} | {k} | {v['archs']} | {v['min_top1']:.4f} | {v['mean_top1']:.4f} "
                f"| {v['max_abs_diff']:.2e} |"
            )
    failed = [(space, f) for space, r in doc["spaces"].items() for f in r["failed"]]
    lines += ["", f"## Failures ({len(failed)})", ""]
    if not failed:
        lines.append("None.")
    for space, f in failed[:100]:
        lines.append(
            f"* {space} `{f['arch']}` in **{f['stage']}** (prune {json.dumps(f['prune'])}): "
            f"{f['error']}"
        )
    if len(failed) > 100:
        lines.append(f"* ... and {len(failed) - 100} more (see the JSON)")
    superseded = doc.get("superseded", [])
    if superseded:
        lines += [
            "",
            f"## Superseded results ({len(superseded)})",
            "",
            "Cases re-run after the INT8 parity rule changed (their first records are kept in "
            f"`{SUPERSEDED}` in the checkpoint folder):",
            "",
        ]
        for r in superseded:
            lines.append(f"* {r['space']} `{r['arch']}`: {r['error']} ({r['superseded']})")
    return "\n".join(lines) + "\n"


def write_results(
    args: argparse.Namespace,
    env: sc.CoverageEnv,
    cases: list[sc.Case],
    records: list[dict[str, Any]],
    wall_seconds: float,
    sessions: int,
) -> dict[str, Any]:
    """Rewrite ``space_coverage.{json,md}`` from the records so far."""
    planned = {
        s: {
            "tried": sum(c.space == s for c in cases),
            "chain_tried": sum(c.space == s and c.chain for c in cases),
        }
        for s in sc.SPACES
    }
    spaces = {s: sc.summarize(records, s) for s in sc.SPACES}
    doc = {
        "benchmark": "space_coverage",
        "finished": all(
            spaces[s]["tried"] == planned[s]["tried"]
            and spaces[s]["chain_tried"] == planned[s]["chain_tried"]
            for s in sc.SPACES
        ),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_seconds": round(wall_seconds, 1),
        "sessions": sessions,
        "workers": args.workers,
        "threads": 1,
        "seed": args.seed,
        "planned": planned,
        "spaces": spaces,
        "settings": env.describe(),
        "system": system_info(threads=1),
        "checkpoint": str(Path(args.work) / CHECKPOINT),
        "superseded": _read_jsonl(Path(args.work) / SUPERSEDED),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    _write_atomic(args.out / "space_coverage.json", json.dumps(doc, indent=2) + "\n")
    _write_atomic(args.out / "space_coverage.md", _md(doc))
    return doc


def _progress(records: list[dict[str, Any]], cases: list[sc.Case], t0: float, new: int) -> str:
    parts = []
    for s in sc.SPACES:
        done = [r for r in records if r["space"] == s]
        n_plan = sum(c.space == s for c in cases)
        ch_plan = sum(c.space == s and c.chain for c in cases)
        fails = sum(not r["ok"] for r in done)
        chain = sum(r["chain"] for r in done)
        parts.append(f"{s} {len(done)}/{n_plan} (chain {chain}/{ch_plan}, failed {fails})")
    rate = new / max(time.time() - t0, 1e-9) * 3600
    return f"[{time.strftime('%H:%M:%S')}] " + "; ".join(parts) + f"; {rate:.0f} cases/h"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cells", type=int, default=10**6, help="cells (default: every one)")
    ap.add_argument("--macro", type=int, default=2000)
    ap.add_argument("--chain", type=int, default=500, help="whole-chain cases per space")
    ap.add_argument("--cell-channels", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--params", type=Path, default=None, help="YAML whose space.macro is used")
    ap.add_argument("--max-hours", type=float, default=None, help="stop (resumable) after this")
    args = ap.parse_args(argv)

    from nasforge.config import load_params

    user = load_params(args.params) if args.params else None
    macro = user.space.macro.model_dump(exclude={"sandwich_random"}) if user else {}
    params_dict = sc.base_params({"space": {"macro": macro}} if macro else None)
    params = params_from_dict(params_dict, "space-coverage")
    args.work.mkdir(parents=True, exist_ok=True)
    plan = {
        "seed": args.seed,
        "cells": args.cells,
        "macro": args.macro,
        "chain": args.chain,
        "cell_channels": args.cell_channels,
        "params": params_dict,
    }
    plan_file = args.work / PLAN
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            print(
                f"error: {plan_file} was planned with other {', '.join(diff)}; "
                "use another --work (or delete it) to start over",
                file=sys.stderr,
            )
            return 2
    else:
        _write_atomic(plan_file, json.dumps(plan, indent=2))

    dataset = sc.prepare_dataset(params_dict, args.work / "data")
    env = sc.CoverageEnv(
        str(dataset), str(args.work / "cases"), params_dict, cell_channels=args.cell_channels
    )
    cases = plan_cases(args, params)
    ckpt = args.work / CHECKPOINT
    records = _read_jsonl(ckpt)
    done = {_key(r["space"], r["arch"]) for r in records}
    records = list({_key(r["space"], r["arch"]): r for r in records}.values())
    todo = [c for c in cases if c.key not in done]
    past = _read_jsonl(args.work / SESSIONS)
    past_wall = sum(s.get("seconds", 0.0) for s in past)
    print(
        f"space coverage: {len(cases)} cases planned, {len(cases) - len(todo)} done before, "
        f"{len(todo)} to run in {args.workers} workers; checkpoint {ckpt}",
        flush=True,
    )
    t0 = last_write = last_print = time.time()
    new = 0
    write_results(args, env, cases, records, past_wall, len(past) + 1)
    try:
        with ckpt.open("a") as f:
            for r in sc.run_cases(todo, env, workers=args.workers):
                f.write(json.dumps(r) + "\n")
                f.flush()
                records.append(r)
                new += 1
                if not r["ok"]:
                    print(f"FAILED: {sc.failure_line(r)}", flush=True)
                now = time.time()
                if now - last_print >= PRINT_EVERY_S:
                    print(_progress(records, cases, t0, new), flush=True)
                    last_print = now
                if now - last_write >= WRITE_EVERY_S:
                    write_results(args, env, cases, records, past_wall + now - t0, len(past) + 1)
                    last_write = now
                if args.max_hours and now - t0 > args.max_hours * 3600:
                    print(f"stopping after {args.max_hours} h (resumable)", flush=True)
                    break
    except KeyboardInterrupt:
        print("interrupted (resumable)", flush=True)
    finally:
        wall = time.time() - t0
        with (args.work / SESSIONS).open("a") as f:
            f.write(json.dumps({"started": t0, "seconds": round(wall, 1), "cases": new}) + "\n")
        doc = write_results(args, env, cases, records, past_wall + wall, len(past) + 1)
        print(_progress(records, cases, t0, new), flush=True)
        print(
            f"wrote {args.out / 'space_coverage.json'} ({'finished' if doc['finished'] else 'not finished'})",
            flush=True,
        )
    failed = sum(len(s["failed"]) for s in doc["spaces"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
