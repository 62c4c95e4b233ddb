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

from stages.pretraining.checkpoints import latest_checkpoint
from stages.pretraining.config import PretrainConfig, PretrainResult
from stages.pretraining.trainer import OnCheckpoint, train

logger = logging.getLogger(__name__)


def torchrun_command(config_path: str | Path, nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "hvp-pretrain", max_restarts: int = 0, resume: bool = False) -> list[str]:
    """The torchrun command line of one node: ``--standalone`` on one machine, else a c10d rendezvous at
    ``rdzv_endpoint`` (host:port of any node that all can reach) that ``nnodes`` nodes join under ``rdzv_id``.
    With ``max_restarts`` torchrun restarts the ranks after one dies, and they resume from the last checkpoint."""
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"{nnodes} nodes need a rendezvous endpoint host:port (rdzv_endpoint) that every node "
                         "reaches, e.g. the first node's address and a free port such as 29400.")
    where = (["--standalone"] if nnodes <= 1 and not rdzv_endpoint else
             ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_endpoint),
              "--rdzv-id", rdzv_id])
    # `python -m torch.distributed.run` is the torchrun entry point, taken from this interpreter's environment.
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "stages.pretraining.launch", "--config", str(config_path),
            *(["--resume"] if resume else [])]


def launch(config: PretrainConfig, nproc: int = 1, resume: bool = False, nnodes: int = 1,
           rdzv_endpoint: str | None = None, max_restarts: int = 0,
           on_checkpoint: OnCheckpoint | None = None) -> PretrainResult:
    """Train in this process (nproc 1 on one node) or under torchrun with `nproc` processes on this node (one per
    GPU, or gloo on CPU), joining `nnodes` nodes at `rdzv_endpoint` when more than one. `on_checkpoint` hears of
    each checkpoint as it is committed (under torchrun: of those kept, when it ends)."""
    if nproc <= 1 and nnodes <= 1:
        return train(config, resume=resume, on_checkpoint=on_checkpoint)
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "launch_config.json"
    cfg_path.write_text(json.dumps(config.to_dict(), indent=2))
    cmd = torchrun_command(cfg_path, nproc, nnodes, rdzv_endpoint, max_restarts=max_restarts, resume=resume)
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
    config = PretrainConfig.load(args.config)
    # torchrun restarted the ranks after one died: continue from the last checkpoint rather than start over
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = args.resume or (restarted and latest_checkpoint(Path(config.out_dir)) is not None)
    if restarted:
        logger.info("torchrun restart %s: %s", os.environ["TORCHELASTIC_RESTART_COUNT"],
                    "resuming from the last checkpoint" if resume else "no checkpoint yet, starting over")
    result = train(config, resume=resume, until_step=args.until_step)
    if result.world_size == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
