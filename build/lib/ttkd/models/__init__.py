"""Architectures, built by name through one registry.

``build(arch, num_classes, in_channels, image_size=...)`` is the public entry;
``names()`` lists what is registered. A constructor is registered with ``@register``
and takes ``num_classes`` and ``in_channels`` plus optional keywords; keywords passed
as ``None`` are dropped, so ``None`` from a command line means "the model's default".

Every model is a :class:`Classifier`: ``features`` (an ``nn.Sequential``) then ``head``.
Feature-based KD reads, without hooks, ``forward_stages(x)``: the output map of each of
the network's stages (resolution groups), ``(B, C_i, H_i, W_i)``, shallow to deep, and
the pooled embedding ``(B, D)`` that the head takes. A network without spatial maps
(``mlp``) reports its hidden layer as one ``(B, D, 1, 1)`` stage.

One file per family: ``basic`` (mlp, the seed's cnn), ``standard`` (ResNet-18/34/50,
DenseNet, ShuffleNetV2 built from torchvision's blocks), ``preact`` (pre-activation
ResNets, ResNeXt, MobileNetV2) and ``cifar`` (the CIFAR-100 zoo of the KD literature:
ResNet-8/20/32/56/110, ResNet-8x4/32x4, WRN, VGG).
"""

from ttkd import config
from ttkd.models.base import Classifier, build, get, names, num_parameters, register  # noqa: F401

# isort: split
from ttkd.models import basic, cifar, preact, standard  # noqa: F401  (they register)

config.provide("arch", config.Provided(names))
