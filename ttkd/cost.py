"""What a model costs to run: parameters, multiply-accumulates, size on disk, latency.

Measured, never counted by hand: parameters and MACs on ttkd's network, times on the
network as it is served (the ONNX network behind the pyfunc, a function of a numpy batch
here); MACs come from PyTorch's own ``torch.utils.flop_counter``
(one multiply-accumulate is two of its FLOPs), times from repeated calls after a warm-up
(the median, so that one slow spell of a shared machine does not decide), at a fixed
thread count that is recorded beside them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

LATENCY_CALLS = 30     # timed calls at batch 1 (after WARMUP_CALLS)
THROUGHPUT_CALLS = 5   # timed calls at THROUGHPUT_BATCH (after one untimed call)
WARMUP_CALLS = 3
THROUGHPUT_BATCH = 256
TIMED_S = 2.0          # the timed calls stop once they have taken this long (one at least): a teacher whose
                       # batch of 256 takes 4 s on one thread is timed once, not five times


@dataclasses.dataclass(frozen=True)
class Cost:
    """One model's cost; ``*_cuda`` only where a GPU was there to measure it."""

    params: int                     # parameters (weights and biases; buffers not counted)
    macs: int                       # multiply-accumulates per image
    model_bytes: int                # the served file (network.onnx)
    threads: int                    # CPU threads the CPU timings ran with
    latency_ms_b1_cpu: float        # one image, median of LATENCY_CALLS calls (within TIMED_S)
    throughput_b256_cpu: float      # images/s at THROUGHPUT_BATCH, median of THROUGHPUT_CALLS calls (within TIMED_S)
    latency_ms_b1_cuda: float | None = None
    throughput_b256_cuda: float | None = None

    def metrics(self) -> dict[str, float]:
        """Run metrics: ``params``, ``macs``, ``model_bytes``, ``latency_ms_b1_cpu``, ..."""
        return {k: float(v) for k, v in dataclasses.asdict(self).items() if v is not None and k != "threads"} | {
            "cost_threads": float(self.threads)}


def parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def macs(net: torch.nn.Module, image_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image through ``net``, by PyTorch's flop counter."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, *image_shape))
    return counter.get_total_flops() // 2


def median_seconds(call: Callable[[], object], calls: int, sync: Callable[[], None] = lambda: None,
                   warmup: int = WARMUP_CALLS) -> float:
    """The median wall time of ``calls`` calls (fewer, one at least, once they have taken
    TIMED_S), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    sync()
    times: list[float] = []
    while len(times) < calls and sum(times) < TIMED_S:
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(net: torch.nn.Module, image_shape: tuple[int, ...], device: torch.device) -> tuple[float, float]:
    """(latency at batch 1 in ms, images/s at THROUGHPUT_BATCH) of ``net`` on ``device``."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    one = torch.rand(1, *image_shape, device=device)
    many = torch.rand(THROUGHPUT_BATCH, *image_shape, device=device)
    with torch.no_grad():
        latency = median_seconds(lambda: net(one), LATENCY_CALLS, sync)
        batch = median_seconds(lambda: net(many), THROUGHPUT_CALLS, sync, warmup=1)
    return latency * 1000, THROUGHPUT_BATCH / batch


def served_speed(served: Callable[[np.ndarray], object], image_shape: tuple[int, ...]) -> tuple[float, float]:
    """(latency at batch 1 in ms, images/s at THROUGHPUT_BATCH) of the served network, a
    function of a float32 ``(N, *image_shape)`` array."""
    rng = np.random.default_rng(0)
    one = rng.random((1, *image_shape), dtype=np.float32)
    many = rng.random((THROUGHPUT_BATCH, *image_shape), dtype=np.float32)
    return (median_seconds(lambda: served(one), LATENCY_CALLS) * 1000,
            THROUGHPUT_BATCH / median_seconds(lambda: served(many), THROUGHPUT_CALLS, warmup=1))


def measure(net: torch.nn.Module, served: Callable[[np.ndarray], object], image_shape: tuple[int, ...],
            model_bytes: int, *, threads: int = 1, on_cuda: tuple[torch.nn.Module, torch.device] | None = None) -> Cost:
    """The cost of ``net`` (ttkd's network, on the CPU) served as ``served`` (the served
    network, made to run on ``threads`` CPU threads) for images of ``image_shape``: its
    parameters and MACs, and the served network's CPU timings; with ``on_cuda`` = (the same
    network in eval mode on a GPU, that GPU), its timings there too."""
    latency, throughput = served_speed(served, image_shape)
    gpu = speed(*on_cuda[:1], image_shape, on_cuda[1]) if on_cuda is not None else (None, None)
    return Cost(parameters(net), macs(net, image_shape), model_bytes, threads, latency, throughput, *gpu)
