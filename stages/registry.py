"""The stage registry: every stage of the pipeline has exactly one runner, a plain function
``run(catalog, config) -> result`` that the flows, the CLI, the fault harness, the benches and the tests all call.

A stage registers a `StageDef` naming its typed config (a pydantic model: the same fields the CLI, the flow
parameters and the profiles fill) and its runner. Callers look a stage up by name; nothing else knows how to run it.
Every run records its resolved config beside its outputs (`record_config`), so a result says what made it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from base.registry import Registry

if TYPE_CHECKING:
    from catalog.catalog import Catalog

#: Catalog folder holding each catalog stage's last resolved config (`stages/<name>.json`).
CONFIG_DIR = "stages"


@dataclass(frozen=True)
class StageDef:
    """One stage: its name, its config model and its runner (``run(catalog, config) -> result``)."""

    name: str
    config: type[BaseModel]
    run: Callable[..., Any]
    description: str


STAGES: Registry[StageDef] = Registry("stage")


def register_stage(name: str, config: type[BaseModel], description: str
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a runner under `name` with its config model."""

    def decorate(run: Callable[..., Any]) -> Callable[..., Any]:
        STAGES.add(name, StageDef(name=name, config=config, run=run, description=description))
        return run

    return decorate


def config_json(stage: str, config: BaseModel) -> bytes:
    """The resolved config of a run as JSON: the stage's name and every field, defaults included."""
    return json.dumps({"stage": stage, "config": config.model_dump(mode="json")}, indent=2, sort_keys=True).encode()


def record_config(catalog: Catalog, stage: str, config: BaseModel) -> str:
    """Write a catalog stage's resolved config to ``<catalog>/stages/<stage>.json`` (atomically: a killed writer
    leaves a temporary that compaction removes); returns its catalog-relative path."""
    rel = f"{CONFIG_DIR}/{stage}.json"
    catalog.storage.put_bytes(rel, config_json(stage, config))
    return rel


def record_run_config(folder: str | Path, stage: str, config: BaseModel) -> Path:
    """Write a run folder's resolved stage config to ``<folder>/stage-config.json`` (write-then-rename)."""
    path = Path(folder) / "stage-config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(config_json(stage, config))
    tmp.replace(path)
    return path
