"""Downstream evaluation on the frozen backbone: features, task heads, metrics and reports.

Entry points: `runners` (`run_features`, `run_heads` with their typed configs, registered stages) and `compare`
(`run_compare`: several backbones, one report). Backbone families: `adapters` (`ADAPTERS`, one per model family).
Tasks: `registry`
(`TaskDef`, `TASKS`), `tasks/` (one module + YAML card per task: segmentation, saliency, tracking). Head runs:
`heads` (train, score, reuse, evaluate again), `spec` (task spec, fingerprint), `outcomes` (stored results, reports),
`train` + `checkpoints` (head-only training on stages.training). Pieces: `features` (the frozen backbone and its
feature cache), `data` + `samples` (catalog splits as samples), `losses`, `evaluate`, `baselines`, `tracker`,
`backbone`, `report`.
"""
