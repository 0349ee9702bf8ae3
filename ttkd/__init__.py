"""ttkd: Trained-Teacher knowledge distillation.

Modules, in the order data flows through them:
    config    every run parameter once: type, default, check; its parser
    presets   how the command line, a preset and the defaults combine
    data      image classification data sets held in memory as uint8 tensors
    models    one registry from architecture name to constructor; stage maps for KD
    kd        training objectives by name: cross-entropy, the trained-teacher term, KD methods
    engine    the training loop for every stage: runs the Step it is given; no MLflow, no printing
    calibration  the training paths' speed by a few timed steps, cached (amp and compile auto)
    choice    the Step (precision, compile) a stage trains with, decided once
    tracking  the door to MLflow's runs: logging, artifacts, checkpoints and their digests
    modelstore  a registered model's files: logged, digested, checked; partners rebuilt from them
    registry  MLflow model references, registration and promotion
    build     a stage's networks and objective, built alike in every process of a group
    callbacks what a stage does after each epoch (checkpoint, metrics, console, a caller's hook)
    console   ttkd's log as a terminal shows it (entry points and a sweep's point logs)
    signals   SIGINT and SIGTERM as stop requests between training steps
    stages    baseline / teach / distill, each an MLflow run: prepare, train, publish
    studies   the whole study as child runs of one parent run
"""

from ttkd.errors import TTKDError

__all__ = ["TTKDError"]
