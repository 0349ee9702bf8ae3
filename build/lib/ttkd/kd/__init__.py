"""Training objectives, distillation methods first: one small ``nn.Module`` each,
registered by name.

The contract. A method is built once per stage from a :class:`Context` and its own
hyper-parameters, may own parameters (a connector, embeddings: the engine trains and
checkpoints them with the network) and buffers (a memory bank: checkpointed), and is
called once per step with a :class:`Batch`. It returns a dict of named scalar parts,
``"loss"`` (what is minimised) first; the engine sums every part over the epoch and the
run logs each as ``train_<part>``. A method with ``features=True`` receives both
networks' stage maps and embeddings (see ``ttkd.models``); the others do not pay for them.

Notation in the docstrings: z_s, z_t student and teacher logits ``(B, K)``; y labels;
T a temperature; p^T = softmax(z / T); KL(p‖q) = Σ_k p_k (log p_k − log q_k); every
term is a batch mean. The network being trained is the student in ``distill`` and the
teacher in ``teach``; its frozen partner's outputs carry no gradient.
"""

from ttkd import config
from ttkd.kd.base import Batch, Context, Shapes, Spec, build, get, names, register, soft_kl  # noqa: F401

# isort: split
from ttkd.kd import logits, intermediate, crd  # noqa: F401,I001  (they register, in this order)

config.provide("method", config.Provided(names))
