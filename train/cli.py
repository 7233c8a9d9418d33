"""Command line of the training application: `python -m train <command>`.

    demo           digits (offline): train a teacher, then students with vanilla, KD, ICD and
                   ICD+KD over several seeds; print top-1 accuracy (mean +- std)
    train-teacher  train a model on a data set with the paper's recipe (the defaults)
    distill        train a student from a teacher checkpoint with a method of the registry
    evaluate       top-1 accuracy of a checkpoint on a data set's test split

Data sets: cifar100, cifar10 (--data ROOT, --download), imagenet, tiny-imagenet (image
folders under --data), digits (embedded, offline). Recipes (overridable): CIFAR 240 epochs,
batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), x0.1 at
150/180/210, weight decay 5e-4; ImageNet 100 epochs, batch 256, lr 0.1, x0.1 at 30/60/90,
weight decay 1e-4.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from . import engine
from .data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets, stratified_subset
from .distillers import DISTILLERS, build_distiller
from .models import build_model

DEMO_METHODS = ("vanilla", "kd", "icd", "icd_kd")


def train_model(method, student, teacher, train_set, test_set, config: engine.TrainConfig,
                lr: float, weight_decay: float, make_scheduler, resume: bool = False):
    """SGD (momentum 0.9) on the student and the method's own modules; make_scheduler(opt)
    gives the learning-rate schedule."""
    distiller = build_distiller(method, student, teacher, num_samples=len(train_set))
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    history = engine.fit(distiller, train_set, test_set, optimizer, make_scheduler(optimizer),
                         config, resume)
    return distiller, history


# The paper's recipes: (epochs, batch size, lr, lr decay epochs, weight decay).
RECIPES = {
    "cifar": (240, 64, 0.05, (150, 180, 210), 5e-4),
    "imagenet": (100, 256, 0.1, (30, 60, 90), 1e-4),
    "digits": (30, 32, 0.05, (20, 25), 5e-4),
}
SMALL_LR_MODELS = ("mobilenet", "shuffle")


def load_data(name: str, root, download: bool):
    """(train set, test set, number of classes, input channels)."""
    from .data import vision

    if name == "digits":
        train_set, test_set = digits_datasets()
        return train_set, test_set, NUM_CLASSES, IN_CHANNELS
    if name in ("cifar100", "cifar10"):
        classes = 100 if name == "cifar100" else 10
        return (*vision.cifar_datasets(root, classes, download), classes, 3)
    if name in ("imagenet", "tiny-imagenet"):
        loader = vision.imagenet_datasets if name == "imagenet" else vision.tiny_imagenet_datasets
        train_set, test_set = loader(root)
        return train_set, test_set, len(train_set.classes), 3
    raise ValueError(f"unknown data set {name!r}")


def recipe(args, model_name: str):
    family = {"cifar100": "cifar", "cifar10": "cifar", "digits": "digits"}.get(args.dataset,
                                                                               "imagenet")
    epochs, batch, lr, milestones, wd = RECIPES[family]
    if family == "cifar" and any(k in model_name.lower() for k in SMALL_LR_MODELS):
        lr = 0.01
    return (args.epochs or epochs, args.batch_size or batch, args.lr or lr,
            tuple(args.lr_decay_epochs or milestones), args.weight_decay or wd)


def load_weights(model, path, name: str) -> None:
    """Loads a checkpoint's model weights; a checkpoint of another architecture is an error
    that says so."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict):
        state = state.get("student", state.get("model", state))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not hold a {name} of this data set "
                         f"(different architecture or number of classes): "
                         f"{str(error).splitlines()[0]}") from error


def run_training(args, method: str, student_name: str, data, teacher=None) -> int:
    """One run of the train-teacher or distill command on data = load_data(...)."""
    engine.seed_everything(args.seed, deterministic=args.deterministic)
    train_set, test_set, classes, channels = data
    student = build_model(student_name, classes, channels)
    epochs, batch, lr, milestones, wd = recipe(args, student_name)
    config = engine.TrainConfig(epochs=epochs, batch_size=batch, seed=args.seed,
                                out_dir=Path(args.out), num_workers=args.workers)
    _, history = train_model(
        method, student, teacher, train_set, test_set, config, lr, wd,
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=0.1),
        resume=args.resume)
    last = history.rows[-1]
    print(f"{method} {student_name}: epoch {last['epoch']}, test top-1 {last['test_acc']:.2f}% "
          f"(best {history.best_accuracy:.2f}%); checkpoints in {args.out}")
    return 0


def train_teacher(args) -> int:
    data = load_data(args.dataset, args.data, args.download)
    return run_training(args, "vanilla", args.model, data)


def distill(args) -> int:
    data = load_data(args.dataset, args.data, args.download)
    classes, channels = data[2], data[3]
    teacher = build_model(args.teacher, classes, channels)
    load_weights(teacher, args.teacher_ckpt, args.teacher)
    return run_training(args, args.method, args.student, data, teacher)


def evaluate_command(args) -> int:
    _, test_set, classes, channels = load_data(args.dataset, args.data, args.download)
    model = build_model(args.model, classes, channels)
    load_weights(model, args.ckpt, args.model)
    print(f"{args.model} ({args.ckpt}): test top-1 {engine.evaluate(model, test_set):.2f}%")
    return 0


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
    def cosine(epochs):
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    teacher = build_model(args.teacher, NUM_CLASSES, IN_CHANNELS)
    teacher_config = engine.TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size)
    _, t_hist = train_model("vanilla", teacher, None, train_set, test_set, teacher_config,
                            args.lr, 5e-4, cosine(args.teacher_epochs))
    print(f"teacher {args.teacher}: {t_hist.rows[-1]['test_acc']:.2f}% "
          f"({time.time() - start:.0f} s)", flush=True)
    results = {}
    for method in args.methods:
        accs = []
        for seed in range(args.seeds):
            engine.seed_everything(seed + 1)
            student = build_model(args.student, NUM_CLASSES, IN_CHANNELS)
            config = engine.TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                        seed=seed + 1)
            _, hist = train_model(method, student, teacher if method != "vanilla" else None,
                                  student_set, test_set, config, args.lr, 5e-4,
                                  cosine(args.epochs))
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

    def data_options(p):
        p.add_argument("--dataset", default="cifar100",
                       choices=["cifar100", "cifar10", "imagenet", "tiny-imagenet", "digits"])
        p.add_argument("--data", default="./data", help="data set root folder")
        p.add_argument("--download", action="store_true", help="fetch CIFAR if missing")

    def training_options(p):
        data_options(p)
        p.add_argument("--out", required=True, help="run folder: checkpoints and log.csv")
        p.add_argument("--epochs", type=int)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--lr-decay-epochs", type=int, nargs="+")
        p.add_argument("--weight-decay", type=float)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--deterministic", action="store_true")
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")

    t = sub.add_parser("train-teacher", help="train a model with cross-entropy")
    training_options(t)
    t.add_argument("--model", required=True)
    t.set_defaults(run=train_teacher)
    s = sub.add_parser("distill", help="train a student from a teacher checkpoint")
    training_options(s)
    s.add_argument("--teacher", required=True)
    s.add_argument("--teacher-ckpt", required=True)
    s.add_argument("--student", required=True)
    s.add_argument("--method", default="icd_kd", choices=sorted(DISTILLERS))
    s.set_defaults(run=distill)
    e = sub.add_parser("evaluate", help="test accuracy of a checkpoint")
    data_options(e)
    e.add_argument("--model", required=True)
    e.add_argument("--ckpt", required=True)
    e.set_defaults(run=evaluate_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, engine.NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
