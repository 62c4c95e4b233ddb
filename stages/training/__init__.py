"""One training stack for every trained thing (the pretraining run, the task heads): device and autocast
selection (`device`), AdamW and the warm-up + cosine schedule (`optim`), the loop's seeded batches and optimisation
step (`loop`) and restartable checkpoint folders (`checkpoints`: safetensors weights, weights_only state, a
`latest` pointer as the commit point, pruning, resume)."""
