"""What serving costs per format: the ONNX network run by onnxruntime (what ttkd registers
and serves) against the same network in torch, eager, on the CPU at one thread.

    python -m benchmarks.served                      # the study's networks and two CIFAR-100 pairs
    python -m benchmarks.served --arch mlp:1x8x8:10  # ARCH:CxHxW:CLASSES, repeatable

Both are timed by ``ttkd.cost`` as a registered model is (median of 30 calls of one image,
of 5 calls of 256 images, after 3 warm-up calls), on one freshly initialised network each;
the ONNX file is written by ``ttkd.modelfile.export_onnx`` and loaded by
``ttkd.serving.load_network``, as a stage does.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from ttkd import cost, modelfile, models, serving

DEFAULT = ("mlp:1x8x8:10", "cnn:1x8x8:10", "resnet8x4:3x32x32:100", "resnet32x4:3x32x32:100",
           "wrn_16_2:3x32x32:100", "wrn_40_2:3x32x32:100")


def measure(spec: str) -> tuple[str, float, float, float, float]:
    """``(arch, ms at batch 1 and images/s at 256 with onnxruntime, the same with torch)``."""
    arch, shape, classes = spec.split(":")
    image_shape = tuple(int(s) for s in shape.split("x"))
    net = models.build(arch, int(classes), image_shape[0], image_size=image_shape[-1]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network.onnx"
        modelfile.export_onnx(net, image_shape, path)
        onnx = cost.served_speed(serving.load_network(str(path), image_shape, int(classes), threads=1), image_shape)
    torch.set_num_threads(1)
    eager = cost.speed(net, image_shape, torch.device("cpu"))
    return arch, *onnx, *eager


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="ARCH:CxHxW:CLASSES (default: the study's and CIFAR's)")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| network | onnxruntime ms (batch 1) | torch ms (batch 1) | x | onnxruntime img/s (batch 256) "
          "| torch img/s (batch 256) | x |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.arch or DEFAULT:
        arch, onnx_ms, onnx_rate, torch_ms, torch_rate = measure(spec)
        print(f"| {arch} | {onnx_ms:.3f} | {torch_ms:.3f} | {torch_ms / onnx_ms:.2f} | {onnx_rate:,.0f} "
              f"| {torch_rate:,.0f} | {onnx_rate / torch_rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
