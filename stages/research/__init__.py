"""The research loop: every pretraining checkpoint evaluated (`run_evaluation`), ablations as a grid
(`run_ablation`), TensorBoard event files and model cards beside every run."""
