"""Command line of the training application: `python -m train <command>`.

    demo       digits (offline): train a teacher, then students with vanilla, KD, ICD and
               ICD+KD over several seeds; print top-1 accuracy (mean +- std)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from . import engine
from .data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets, stratified_subset
from .distillers import build_distiller
from .models import build_model

DEMO_METHODS = ("vanilla", "kd", "icd", "icd_kd")


def train_model(method, student, teacher, train_set, test_set, epochs, batch_size, lr, seed,
                out_dir=None, resume=False):
    distiller = build_distiller(method, student, teacher)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    config = engine.TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed,
                                out_dir=out_dir)
    history = engine.fit(distiller, train_set, test_set, optimizer, scheduler, config, resume)
    return distiller, history


def demo(args) -> int:
    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, test_set = digits_datasets(image_size=args.image_size)
    # The teacher learns from the whole training split, the students from a small part of
    # it: the regime where what a teacher passes on shows in the students' accuracy.
    student_set = stratified_subset(train_set, args.student_fraction, seed=0)
    print(f"digits: {len(train_set)} train ({len(student_set)} for the students) / "
          f"{len(test_set)} test images, {args.image_size}x{args.image_size}; "
          f"teacher {args.teacher}, student {args.student}")
    engine.seed_everything(0)
    teacher = build_model(args.teacher, NUM_CLASSES, IN_CHANNELS)
    _, t_hist = train_model("vanilla", teacher, None, train_set, test_set, args.teacher_epochs,
                            args.batch_size, args.lr, seed=0)
    print(f"teacher {args.teacher}: {t_hist.rows[-1]['test_acc']:.2f}% "
          f"({time.time() - start:.0f} s)", flush=True)
    results = {}
    for method in args.methods:
        accs = []
        for seed in range(args.seeds):
            engine.seed_everything(seed + 1)
            student = build_model(args.student, NUM_CLASSES, IN_CHANNELS)
            _, hist = train_model(method, student, teacher if method != "vanilla" else None,
                                  student_set, test_set, args.epochs, args.batch_size, args.lr,
                                  seed=seed + 1)
            accs.append(hist.rows[-1]["test_acc"])
        results[method] = accs
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{method:>8}: {mean:6.2f} +- {std:4.2f} % top-1 over {len(accs)} seeds "
              f"({time.time() - start:.0f} s)", flush=True)
    print("\n| method | top-1 % (mean +- std) |\n|---|---|")
    for method, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {statistics.mean(accs):.2f} +- {std:.2f} |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="offline digits demo: teacher, then four student methods")
    d.add_argument("--teacher", default="resnet20")
    d.add_argument("--student", default="resnet8")
    d.add_argument("--image-size", type=int, default=16)
    d.add_argument("--teacher-epochs", type=int, default=15)
    d.add_argument("--epochs", type=int, default=30)
    d.add_argument("--student-fraction", type=float, default=0.1,
                   help="share of the training split the students learn from")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    d.add_argument("--threads", type=int, default=0)
    d.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
