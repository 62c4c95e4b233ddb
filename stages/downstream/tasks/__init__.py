"""The downstream tasks, one module and one YAML card each; importing this package registers them in `TASKS`.
Adding a task: write its module (hooks + `register_task(card, ...)`) and card, and import the module here."""

from stages.downstream.registry import TASKS, TaskDef, ordered_tasks
from stages.downstream.tasks import (  # noqa: F401  (registers the tasks)
    airborne_change,
    airborne_classification,
    airborne_detection,
    saliency,
    segmentation,
    tracking,
)

__all__ = ["TASKS", "TaskDef", "ordered_tasks"]
