"""The stage registry: every stage of the pipeline has exactly one runner, a plain function
``run(catalog, config) -> result`` that the flows, the CLI, the fault harness, the benches and the tests all call.

A stage registers a `StageDef` naming its typed config (a pydantic model: the same fields the CLI, the flow
parameters and the profiles fill) and its runner. Callers look a stage up by name; nothing else knows how to run it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from infra.registry import Registry


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
