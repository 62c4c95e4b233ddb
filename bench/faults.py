"""Fault injection at scale: kill -9 each stage (ingest, label, fuse, pretrain) at seeded random points, run it
again, and count the runs that leave the catalog and the training run exactly as an uninterrupted run does.

Target: every trial survives (50/50 by default). See tests/faults/harness.py for the kill points and the checks.

    .venv/bin/python bench/faults.py [--trials 50] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import harness as faults  # noqa: E402  (after the path set-up, so the bench runs from a checkout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="kill-and-rerun trials, spread over the stages")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--json", action="store_true", help="print every trial as JSON (before the figures line)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hvp-faults-") as tmp:
        t0 = time.perf_counter()
        setup = faults.build_setup(Path(tmp) / "setup")
        print(f"set-up (fixtures and one uninterrupted run of each stage) in {time.perf_counter() - t0:.0f} s; "
              f"kill points per stage: {setup.points}", flush=True)
        per_stage = {s: args.trials // len(faults.STAGES) + (i < args.trials % len(faults.STAGES))
                     for i, s in enumerate(faults.STAGES)}
        trials: list[faults.Trial] = []
        for stage, n in per_stage.items():
            for kill_at in faults.kill_points(setup, stage, n, args.seed):
                t1 = time.perf_counter()
                result = faults.trial(setup, stage, kill_at, Path(tmp) / "trial")
                trials.append(result)
                verdict = "survived" if result.survived else "FAILED: " + "; ".join(result.problems[:3])
                print(f"  {stage:9s} killed at point {kill_at:5d}/{result.points:<5d} "
                      f"{'(fired)' if result.killed else '(not reached)'} {verdict} "
                      f"[{time.perf_counter() - t1:.1f} s]", flush=True)

    rows = faults.summary(trials)
    print(f"\n{'stage':10s} {'trials':>6s} {'killed':>6s} {'survived':>8s} {'rate':>6s}")
    for r in rows:
        print(f"{r['stage']:10s} {r['trials']:6d} {r['killed']:6d} {r['survived']:8d} {r['rate']:6.2f}")
    survived = sum(t.survived for t in trials)
    killed = sum(t.killed for t in trials)
    print(f"survived {survived}/{len(trials)} kill -9 trials ({killed} kills fired) in "
          f"{time.perf_counter() - t0:.0f} s (target: {len(trials)}/{len(trials)})")
    if args.json:
        print(json.dumps({"summary": rows, "trials": [faults.as_dict(t) for t in trials]}))
    print(json.dumps({"figures": [
        {"name": "faults_survived", "value": survived, "target": len(trials), "met": survived == len(trials)},
        {"name": "faults_survival_rate", "value": round(survived / max(len(trials), 1), 3), "target": 1.0,
         "met": survived == len(trials)},
    ]}))


if __name__ == "__main__":
    main()
