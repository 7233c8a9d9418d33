"""Step time of CRD with the benchmark's K = 16384 negatives against K = 4096.

One step = teacher and student forward, class-aware draw, both memory-bank NCE terms,
backward, SGD step and bank update, on the digits demo's models (student resnet8, teacher
resnet20, 16x16 digits, batch 64). The class-aware draw alone is timed too, on labels shaped
like CIFAR-100's training set (50,000 samples, 100 classes), where the negatives are drawn
without replacement. Each figure is the median of --repeats timings with min and max; the
machine (lscpu) is printed with them.

    PYTHONPATH=. python bench/crd_step.py [--repeats 7] [--device cpu] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

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


def timings(step, repeats: int, warmup: int, device: torch.device):
    def synced():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        synced()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        synced()
        seconds.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds),
            "max_ms": 1e3 * max(seconds), "repeats": repeats}


def crd_step_timing(num_negatives, batch_size, repeats, warmup, device):
    train, _ = digits_datasets(image_size=16)
    images, labels = train.tensors
    torch.manual_seed(0)
    distiller = build_distiller(
        "crd", build_model("resnet8", NUM_CLASSES, IN_CHANNELS),
        build_model("resnet20", NUM_CLASSES, IN_CHANNELS), num_samples=len(train),
        labels=dataset_labels(train), num_negatives=num_negatives).to(device)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    order = torch.randperm(len(train))

    def step():
        batch = order[torch.randint(0, len(train) - batch_size, ()):][:batch_size]
        _, losses = distiller(images[batch].to(device), labels[batch].to(device),
                              batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return timings(step, repeats, warmup, device)


def draw_timing(num_negatives, batch_size, repeats, warmup, device):
    labels = torch.arange(100).repeat_interleave(500)  # CIFAR-100's training set
    sampler = ClassAwareNegatives(labels, num_negatives).to(device)
    anchors = torch.randperm(len(labels), device=device)[:batch_size]
    return timings(lambda: sampler(anchors), repeats, warmup, device)


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
    result = {"machine": machine(), "device": str(device), "batch_size": args.batch_size,
              "crd_step": {}, "class_aware_draw_cifar100": {}}
    print(f"machine: {result['machine']}; device {device}; batch {args.batch_size}")
    for k in NEGATIVES:
        step = crd_step_timing(k, args.batch_size, args.repeats, args.warmup, device)
        draw = draw_timing(k, args.batch_size, args.repeats, args.warmup, device)
        result["crd_step"][k], result["class_aware_draw_cifar100"][k] = step, draw
        print(f"K = {k:5d}: CRD step (digits demo, resnet20 -> resnet8) "
              f"{step['median_ms']:8.1f} ms [{step['min_ms']:.1f}, {step['max_ms']:.1f}]; "
              f"class-aware draw alone (CIFAR-100 labels) {draw['median_ms']:7.1f} ms "
              f"[{draw['min_ms']:.1f}, {draw['max_ms']:.1f}]  (median [min, max] of "
              f"{args.repeats})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
