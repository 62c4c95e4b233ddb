"""HyperVision pretraining: catalog crops with fused prompts (data), batches on the device (device_batches), the
restartable trainer, checkpoints, launcher.

The public entry points are re-exported here: the stage runner `run_pretrain` with its `PretrainStageConfig`, and
`PretrainConfig`, `launch`, `train`, `PretrainResult`.
"""

from stages.pretraining.config import RANDOM_INIT, PretrainConfig, PretrainResult
from stages.pretraining.launch import launch
from stages.pretraining.objectives import OBJECTIVES
from stages.pretraining.run import PretrainStageConfig, run_pretrain
from stages.pretraining.trainer import train

__all__ = ["OBJECTIVES", "RANDOM_INIT", "PretrainConfig", "PretrainResult", "PretrainStageConfig", "launch",
           "run_pretrain", "train"]
