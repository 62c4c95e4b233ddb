"""Downstream evaluation on the frozen backbone: features, task heads, metrics and reports."""
