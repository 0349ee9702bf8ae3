"""ttkd: Trained-Teacher knowledge distillation.

Modules, in the order data flows through them:
    config    every run parameter once: type, default, check; presets
    data      image classification data sets held in memory as uint8 tensors
    models    one registry from architecture name to constructor; stage maps for KD
    kd        training objectives by name: cross-entropy, the trained-teacher term, KD methods
    engine    the training loop for every stage; no MLflow, no printing
    calibration  the training paths' speed by a few timed steps, cached (amp and compile auto)
    tracking  MLflow logging, checkpoints, partners rebuilt from a run's weights
    registry  MLflow model references, registration and promotion
    stages    baseline / teach / distill, each an MLflow run
    studies   the whole study as child runs of one parent run
"""

from ttkd.errors import TTKDError

__all__ = ["TTKDError"]
