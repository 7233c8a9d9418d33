"""Step time of CRD with the benchmark's K = 16384 negatives against K = 4096.

One step = teacher and student forward, class-aware draw, both memory-bank NCE terms,
backward, SGD step and bank update, on the digits demo's models (student resnet8, teacher
resnet20, 16x16 digits, batch 64); a KD step on the same models shows the share of CRD,
and a CRD step with linear models (256 -> 10) what CRD itself costs. The class-aware draw alone is timed too, on labels shaped
like CIFAR-100's training set (50,000 samples, 100 classes), where the negatives are drawn
without replacement. Each figure is the median of --repeats timings with min and max; the
machine (lscpu) is printed with them.

    PYTHONPATH=. python bench/crd_step.py [--repeats 7] [--device cpu] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict

import torch
from torch import nn

from train.data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets
from train.data.labels import dataset_labels
from train.distillers import build_distiller
from train.distillers.class_negatives import ClassAwareNegatives
from train.models import build_model

NEGATIVES = (4096, 16384)


def machine() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        flags = fields.get("Flags", "")
        isa = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
        return (f"{fields.get('Model name', '?').strip()}, {platform.machine()} {isa}, "
                f"{fields.get('CPU(s)', '?').strip()} CPUs, torch threads "
                f"{torch.get_num_threads()}")
    except OSError:
        return platform.processor() or platform.machine()


def interleaved_timings(steps: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                        device: torch.device) -> Dict[str, dict]:
    """Each repeat times every step once, in turn, so that a change in the machine's load
    falls on all of them alike."""
    def synced(step):
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for step in steps.values():
            synced(step)
    seconds = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            synced(step)
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s),
                   "max_ms": 1e3 * max(s), "repeats": repeats}
            for name, s in seconds.items()}


def demo_models():
    return (build_model("resnet8", NUM_CLASSES, IN_CHANNELS),
            build_model("resnet20", NUM_CLASSES, IN_CHANNELS))


def linear_models():
    """Students and teachers that cost next to nothing: what remains is the method's own."""
    return tuple(nn.Sequential(nn.Flatten(), nn.Linear(256, NUM_CLASSES)) for _ in range(2))


def training_step(method, batch_size, device, models=demo_models, **options):
    """One optimiser step of `method` on a random batch of the digits demo's data."""
    train, _ = digits_datasets(image_size=16)
    images, labels = train.tensors
    torch.manual_seed(0)
    distiller = build_distiller(method, *models(), num_samples=len(train),
                                labels=dataset_labels(train), **options).to(device)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)

    def step():
        batch = torch.randperm(len(train))[:batch_size]
        _, losses = distiller(images[batch].to(device), labels[batch].to(device),
                              batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def class_aware_draw(num_negatives, batch_size, device):
    labels = torch.arange(100).repeat_interleave(500)  # CIFAR-100's training set
    sampler = ClassAwareNegatives(labels, num_negatives).to(device)
    anchors = torch.randperm(len(labels), device=device)[:batch_size]
    return lambda: sampler(anchors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (a median of >= 5 timings)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine()}; device {device}; batch {args.batch_size}; median "
          f"[min, max] of {args.repeats} interleaved repeats", flush=True)
    steps = {"kd step (no CRD, for reference)": training_step("kd", args.batch_size, device)}
    for k in NEGATIVES:
        steps[f"crd step, K = {k}"] = training_step("crd", args.batch_size, device,
                                                   num_negatives=k)
    for k in NEGATIVES:
        steps[f"crd step, linear models, K = {k}"] = training_step(
            "crd", args.batch_size, device, linear_models, num_negatives=k)
    for k in NEGATIVES:
        steps[f"class-aware draw alone, CIFAR-100 labels, K = {k}"] = class_aware_draw(
            k, args.batch_size, device)
    load_before = os.getloadavg()
    figures = interleaved_timings(steps, args.repeats, args.warmup, device)
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    for name, f in figures.items():
        print(f"{name:>53}: {f['median_ms']:8.1f} ms [{f['min_ms']:.1f}, {f['max_ms']:.1f}]")
    result = {"machine": machine(), "device": str(device), "batch_size": args.batch_size,
              "models": "digits demo: teacher resnet20, student resnet8, 16x16",
              "load_average": load, "timings": figures}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
