"""Automations a server of this project carries: a flow run whose heartbeats stop is marked Crashed.

A flow run's process sends `prefect.flow-run.heartbeat` every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (Prefect's
default 180 s, 30 s at least) while it runs. When the process or its machine dies, nothing tells the server, and the
run would stay Running for ever: a pretraining run of many hours looks the same as a dead one. The automation below
is a proactive trigger per flow run: after a heartbeat, if neither another heartbeat nor a terminal state arrives
within `crashed_after_s`, the run is set Crashed. A run that is alive is never touched however long it lasts, as
long as its heartbeat period is well below the window.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

CRASHED_RUNS = "hvp: mark flow runs without heartbeats crashed"
#: Prefect's own heartbeat period when PREFECT_FLOWS_HEARTBEAT_FREQUENCY is not set.
PREFECT_DEFAULT_HEARTBEAT_S = 180


def check_window(crashed_after_s: float, heartbeat_s: float | None) -> None:
    """A window shorter than twice the heartbeat period would crash live runs between two heartbeats."""
    period = heartbeat_s or PREFECT_DEFAULT_HEARTBEAT_S
    if crashed_after_s < 2 * period:
        raise ValueError(f"HVP_CRASHED_AFTER_S={crashed_after_s:g} is shorter than twice the flow runs' heartbeat "
                         f"period ({period:g} s, PREFECT_FLOWS_HEARTBEAT_FREQUENCY): live runs would be marked "
                         f"Crashed between heartbeats; raise it to at least {2 * period:g} or send heartbeats "
                         "more often")


def crashed_runs_automation(crashed_after_s: float) -> object:
    """The automation (not yet created): a flow run silent for `crashed_after_s` after a heartbeat is Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=CRASHED_RUNS,
        description=f"A running flow run from which no heartbeat arrived for {crashed_after_s:g} s (its process or "
                    "machine died) is marked Crashed, so that its concurrency slot is freed and it can be rerun.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crashed_after_s),
        ),
        actions=[ChangeFlowRunState(name=None, state=StateType.CRASHED, force=False,
                                    message=f"no heartbeat for {crashed_after_s:g} s: its process or machine died")],
    )


def ensure_crashed_runs_automation(crashed_after_s: float, heartbeat_s: float | None) -> str:
    """Create the automation on the configured server, or replace it when its window differs; returns what was
    done ("created", "updated" or "unchanged")."""
    from prefect.automations import Automation

    check_window(crashed_after_s, heartbeat_s)
    wanted = crashed_runs_automation(crashed_after_s)
    try:
        current: Any = Automation.read(name=CRASHED_RUNS)  # the sync form (async_dispatch types it as a coroutine)
    except ValueError:  # none of that name
        wanted.create()  # type: ignore[attr-defined]
        return "created"
    if current.trigger.within == timedelta(seconds=crashed_after_s) and current.enabled:
        return "unchanged"
    current.delete()
    wanted.create()  # type: ignore[attr-defined]
    return "updated"
