"""Launching a pretraining run in this process, or under torchrun as
`python -m stages.pretraining.launch --config run.json`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.pretraining.config import PretrainConfig, PretrainResult
from stages.pretraining.trainer import OnCheckpoint, train

logger = logging.getLogger(__name__)


def launch(config: PretrainConfig, nproc: int = 1, resume: bool = False,
           on_checkpoint: OnCheckpoint | None = None) -> PretrainResult:
    """Train in this process (nproc 1) or under torchrun with `nproc` processes (one per GPU, or gloo on CPU).
    `on_checkpoint` hears of each checkpoint as it is committed (under torchrun: of those kept, when it ends)."""
    if nproc <= 1:
        return train(config, resume=resume, on_checkpoint=on_checkpoint)
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "launch_config.json"
    cfg_path.write_text(json.dumps(config.to_dict(), indent=2))
    # `python -m torch.distributed.run` is the torchrun entry point, taken from this interpreter's environment.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "stages.pretraining.launch", "--config", str(cfg_path), *(["--resume"] if resume else [])]
    log = run_dir / "torchrun.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=str(Path(__file__).resolve().parents[1]), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"torchrun exited with {proc.returncode} for {cfg_path} ({' '.join(cmd)}); "
                           f"full log in {log}:\n{tail}")
    data = json.loads((run_dir / "result.json").read_text())
    if on_checkpoint is not None:
        kept = sorted(run_dir.glob("checkpoints/step_*"), key=lambda p: int(p.name.split("_")[1]))
        for ckpt in kept:
            on_checkpoint(int(ckpt.name.split("_")[1]), ckpt)
    return PretrainResult(**data)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line for torchrun: `python -m stages.pretraining.launch --config run.json [--resume]
    [--until-step N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="PretrainConfig JSON (or a run's config.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    parser.add_argument("--until-step", type=int, default=None, help="stop (with a checkpoint) after this step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(PretrainConfig.load(args.config), resume=args.resume, until_step=args.until_step)
    if result.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
