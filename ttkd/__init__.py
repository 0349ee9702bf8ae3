"""ttkd: Trained-Teacher knowledge distillation.

Modules, in the order data flows through them:
    data      image classification data sets held in memory as uint8 tensors
    models    one registry from architecture name to constructor
    losses    cross-entropy, the trained-teacher loss and the distillation loss
    train     the training engine: one loop for every stage
    registry  MLflow model references, registration and promotion
    stages    baseline / teach / distill / the whole study, tracked in MLflow
"""

from ttkd.errors import TTKDError

__all__ = ["TTKDError"]
