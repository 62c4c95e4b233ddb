"""The research loop on a real `prefect server start` (through `hvp ui`): a pretraining run of the `pretrain`
deployment commits three checkpoints, each emits `hvp.checkpoint.saved`, and the `evaluate` deployment's trigger
(not the pretraining flow) runs three evaluations whose rows, plot and best-checkpoint artifacts land in the run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from catalog.catalog import Catalog
from catalog.fixtures import write_dataset
from stages.ingest import IngestConfig, run_ingest
from tests.pipelines.test_server import _free_port, _owned_pids, _wait_for
from tests.stages.test_research import synthetic_fused

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_three_checkpoints_are_evaluated_by_events_on_a_real_server(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work, port = tmp_path / "hvp", _free_port()
    for slug in ("hsi-drive-v2-0", "cave"):  # the sources are not empty: no fixtures are written
        write_dataset(slug, work / "sources")
    cat = Catalog(str(work / "catalog")).init()
    assert not run_ingest(cat, IngestConfig(source_root=str(work / "sources"))).problems
    synthetic_fused(cat, "cave")
    env = {**os.environ, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_WORKER_PREFETCH_SECONDS": "5", "PREFECT_LOGGING_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "hvp-ui.log"
    with log.open("wb") as fh:
        ui = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ui", "--workdir", str(work), "--port",
                               str(port), "--watch-interval", "3600"], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    async def pause_relabel_and_run_pretrain() -> Any:
        async with get_client() as client:
            relabel = await client.read_deployment_by_name("relabel-new/relabel-new")
            for sched in await client.read_deployment_schedules(relabel.id):
                await client.update_deployment_schedule(relabel.id, sched.id, active=False)
            dep = await client.read_deployment_by_name("pretrain/pretrain")
            params = {"profile": "test", "paths": {"datasets": ["cave"]},
                      "pretrain": {"steps": 6, "checkpoint_every": 2, "crop_size": 16, "device": "cpu"},
                      "downstream": {"tasks": ["segmentation"], "steps": 2, "device": "cpu"}}
            return await client.create_flow_run_from_deployment(dep.id, parameters=params)

    async def runs(name: str) -> list[Any]:
        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
                any_=[name])))

    async def artifact_keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    try:
        _wait_for(lambda: "Prefect UI:" in log.read_text() or ui.poll() is not None, 600, "hvp ui to start", log)
        assert ui.poll() is None, log.read_text()
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            pre = asyncio.run(pause_relabel_and_run_pretrain())

            def pretrain_done() -> Any:
                state = next(r for r in asyncio.run(runs("pretrain")) if r.id == pre.id).state
                return state if state is not None and state.is_final() else None

            assert _wait_for(pretrain_done, 900, "the pretraining run to finish", log).is_completed()

            def evaluations_done() -> list[Any] | None:
                found = [r for r in asyncio.run(runs("evaluate")) if r.state is not None and r.state.is_final()]
                return found if len(found) >= 3 else None

            evaluated = _wait_for(evaluations_done, 1200, "three triggered evaluations to finish", log)
            assert all(r.state.is_completed() for r in evaluated), [r.state for r in evaluated]
            assert all(r.created_by is not None and r.created_by.type == "AUTOMATION" for r in evaluated)
            assert len(evaluated) == 3  # one per checkpoint, none started by the pretraining flow
            run_dir = next((work / "runs").glob("pretrain-tiny-*"))
            table = pd.read_parquet(run_dir / "evaluations" / "evaluations.parquet")
            assert sorted(table["step"]) == [2, 4, 6] and table["sha256"].nunique() == 3
            assert sorted(int(r.parameters["step"]) for r in evaluated) == [2, 4, 6]
            keys = asyncio.run(artifact_keys())
            key = f"evaluation-{run_dir.name}".lower()
            assert {f"{key}-best", f"{key}-curves"} <= keys
            for snap in sorted((run_dir / "snapshots").glob("step_*")):
                card = json.loads((snap / "model-card.json").read_text())
                assert len(card["metrics"]) == 1 and card["metrics"][0]["task"] == "segmentation"
            assert (run_dir / "evaluations" / "metric_vs_step.png").is_file()
    finally:
        if ui.poll() is None:
            os.kill(ui.pid, signal.SIGTERM)
        ui.wait(120)
    assert not _owned_pids(work / "prefect"), "hvp ui left processes behind"
