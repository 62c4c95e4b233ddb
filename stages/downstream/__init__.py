"""Downstream evaluation on the frozen backbone: features, task heads, metrics and reports.

Modules: `samples` (frozen features + labels), `tasks` (head losses), `train` (head-only training, checkpoints,
resume), `evaluate` (predictions and scores), `tracker` (Siamese online tracker), `backbone` (frozen feature
function), `metrics`, `baselines`, `report`.
"""
