"""HyperFree's tuning-free tasks on airborne scenes (classification, one-class, target, anomaly, change,
segment-anything) from cached masks and features, with classical baselines beside them. See README.md."""
