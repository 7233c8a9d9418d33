"""Command line of the training application: `python -m train <command>`.

    demo           digits (offline): train a teacher, then students with vanilla, KD, ICD and
                   ICD+KD over several seeds; print top-1 accuracy (mean +- std)
    train-teacher  train a model on a data set with the paper's recipe (the defaults)
    distill        train a student from a teacher checkpoint with a method of the registry
    evaluate       top-1 accuracy of a checkpoint on a data set's test split
    linear-probe   transfer: a linear classifier on a frozen checkpoint's features (STL-10,
                   Tiny-ImageNet)
    configs        list the configs, one per row of the paper's tables and method
    run            run one config: the teacher (trained first when its checkpoint is
                   missing), the student, and for transfer configs the linear probes
    results        the tables, from the finished runs (mean +- std over seeds)

Data sets: cifar100, cifar10 (--data ROOT, --download), imagenet, tiny-imagenet (image
folders under --data), digits (embedded, offline). Recipes (overridable): CIFAR 240 epochs,
batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), x0.1 at
150/180/210, weight decay 5e-4; ImageNet 100 epochs, batch 256, lr 0.1, x0.1 at 30/60/90,
weight decay 1e-4.

Multi-GPU / multi-node: start train-teacher, distill or run under torchrun (e.g.
`torchrun --nproc_per_node 8 -m train distill ...`); --batch-size stays the global batch.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import distributed, engine
from .configs import CONFIGS, METHODS as METHOD_ORDER, TABLES, get_config
from .data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets, stratified_subset
from .distillers import DISTILLERS, build_distiller
from .models import build_model

DEMO_METHODS = ("vanilla", "kd", "icd", "icd_kd")


def train_model(method, student, teacher, train_set, test_set, config: engine.TrainConfig,
                lr: float, weight_decay: float, make_scheduler, resume: bool = False,
                device: torch.device = torch.device("cpu"), sync_bn: bool = False):
    """SGD (momentum 0.9) on the student and the method's own modules; make_scheduler(opt)
    gives the learning-rate schedule."""
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU "
                             "implementation)")
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    distiller = build_distiller(method, student, teacher, num_samples=len(train_set)).to(device)
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


def read_checkpoint(path) -> dict:
    """A model's state dict from a checkpoint of this application (or a bare state dict)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict):
        state = state.get("student", state.get("model", state))
    return state


def load_weights(model, path, name: str) -> None:
    """Loads a checkpoint's model weights; a checkpoint of another architecture is an error
    that says so."""
    try:
        model.load_state_dict(read_checkpoint(path))
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not hold a {name} of this data set "
                         f"(different architecture or number of classes): "
                         f"{str(error).splitlines()[0]}") from error


def say(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if distributed.is_main():
        print(*args, **kwargs, flush=True)


def run_training(args, method: str, student_name: str, data, out: Path, teacher=None,
                 epochs=None, resume=None):
    """One training run (teacher or student) on data = load_data(...); returns its History."""
    device = distributed.init_from_env(args.device)
    # DDP starts every rank from rank 0's weights; the ranks' random streams differ.
    engine.seed_everything(args.seed + distributed.rank(), deterministic=args.deterministic)
    train_set, test_set, classes, channels = data
    student = build_model(student_name, classes, channels)
    if teacher is not None:
        teacher = teacher.to(device)
    r_epochs, batch, lr, milestones, wd = recipe(args, student_name)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    config = engine.TrainConfig(epochs=epochs or r_epochs, batch_size=batch, seed=args.seed,
                                out_dir=Path(out), num_workers=args.workers,
                                precision=args.precision, progress=progress,
                                tensorboard=args.tensorboard)
    _, history = train_model(
        method, student, teacher, train_set, test_set, config, lr, wd,
        lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=0.1),
        resume=args.resume if resume is None else resume, device=device, sync_bn=args.sync_bn)
    last = history.rows[-1]
    say(f"{method} {student_name}: epoch {last['epoch']}, test top-1 {last['test_acc']:.2f}% "
        f"(best {history.best_accuracy:.2f}%); checkpoints in {out}")
    return history


def load_teacher(name: str, ckpt, classes: int, channels: int):
    teacher = build_model(name, classes, channels)
    load_weights(teacher, ckpt, name)
    return teacher


def train_teacher(args) -> int:
    data = load_data(args.dataset, args.data, args.download)
    run_training(args, "vanilla", args.model, data, Path(args.out))
    return 0


def distill(args) -> int:
    data = load_data(args.dataset, args.data, args.download)
    teacher = load_teacher(args.teacher, args.teacher_ckpt, data[2], data[3])
    run_training(args, args.method, args.student, data, Path(args.out), teacher)
    return 0


def evaluate_command(args) -> int:
    device = distributed.init_from_env(args.device)
    _, test_set, classes, channels = load_data(args.dataset, args.data, args.download)
    model = build_model(args.model, classes, channels)
    load_weights(model, args.ckpt, args.model)
    accuracy = engine.evaluate(model.to(device), test_set, num_workers=args.workers)
    say(f"{args.model} ({args.ckpt}): test top-1 {accuracy:.2f}%")
    return 0


def load_probe_data(name: str, root, image_size: int, download: bool = False):
    """(train, test, classes) of a transfer set, both splits without augmentation."""
    from .data import vision

    if name == "stl10":
        train_set, test_set = vision.stl10_datasets(root, image_size, download)
        classes = 10
    elif name == "tiny-imagenet":
        train_set, test_set = vision.tiny_imagenet_datasets(root, image_size)
        classes = len(train_set.classes)
    else:
        raise ValueError(f"unknown transfer data set {name!r}; known: stl10, tiny-imagenet")
    train_set.transform = test_set.transform  # frozen features: one view of each image
    return train_set, test_set, classes


def probe(model_name: str, ckpt, dataset: str, root, args) -> float:
    from .probe import ProbeRecipe, classes_in_state_dict, linear_probe

    device = distributed.init_from_env(args.device)
    state = read_checkpoint(ckpt)
    in_channels = 3
    model = build_model(model_name, 2, in_channels)
    model = build_model(model_name, classes_in_state_dict(model, state), in_channels)
    load_weights(model, ckpt, model_name)
    train_set, test_set, classes = load_probe_data(dataset, root, args.image_size,
                                                   getattr(args, "download", False))
    recipe_ = ProbeRecipe(epochs=args.probe_epochs, batch_size=args.probe_batch_size,
                          lr=args.probe_lr, lr_decay_epochs=tuple(args.probe_lr_decay_epochs),
                          seed=args.seed, num_workers=args.workers)
    accuracy, _ = linear_probe(model.to(device), train_set, test_set, classes, recipe_)
    say(f"linear probe of {model_name} ({ckpt}) on {dataset}: test top-1 {accuracy:.2f}%")
    return accuracy


def linear_probe_command(args) -> int:
    probe(args.model, args.ckpt, args.dataset, args.data, args)
    return 0


def list_configs(args) -> int:
    for table, (dataset, pairs) in TABLES.items():
        print(f"{table} (trained on {dataset}):")
        for name, config in CONFIGS.items():
            if config.table == table:
                print(f"  {name}")
    return 0


def run_config(args) -> int:
    """Teacher (trained first unless its checkpoint exists), student, and for transfer
    configs the linear probes; every stage resumes from its last checkpoint."""
    config = get_config(args.config)
    args.dataset = config.dataset
    runs = Path(args.runs)
    data = load_data(config.dataset, args.data, args.download)
    teacher = None
    if config.method != "vanilla":
        ckpt = Path(args.teacher_ckpt) if args.teacher_ckpt else (
            runs / config.dataset / f"teacher-{config.teacher}" / "best.pt")
        if not args.teacher_ckpt:  # a finished teacher run resumes to nothing
            say(f"teacher {config.teacher}: {ckpt.parent}")
            run_training(args, "vanilla", config.teacher, data, ckpt.parent,
                         epochs=args.teacher_epochs, resume=True)
        teacher = load_teacher(config.teacher, ckpt, data[2], data[3])
    out = Path(args.out) if args.out else runs / run_folder_name(config.name, args.seed)
    run_training(args, config.method, config.student, data, out, teacher, resume=True)
    for transfer_set in config.transfer_sets:
        root = args.stl10_data if transfer_set == "stl10" else args.tiny_imagenet_data
        accuracy = probe(config.student, out / "best.pt", transfer_set, root, args)
        if distributed.is_main():
            (out / f"probe-{transfer_set}.json").write_text(json.dumps(
                {"dataset": transfer_set, "test_acc": accuracy, "checkpoint": "best.pt"}))
    return 0


def run_folder_name(config_name: str, seed) -> str:
    """The run folder of a config and seed (seed "*" gives the glob of all its seeds)."""
    return f"{config_name.replace('/', '__')}__seed{seed}"


def results_command(args) -> int:
    """The paper's tables from the run folders of `run`: final test top-1, mean +- std over
    seeds, one row per teacher/student pair, one column per method."""
    print(results_tables(Path(args.runs)))
    return 0


def results_tables(runs: Path) -> str:
    cells = {}  # (table, pair, column) -> accuracies over seeds
    for config in CONFIGS.values():
        for folder in sorted(runs.glob(run_folder_name(config.name, "*"))):
            log = folder / "log.csv"
            if not log.exists():
                continue
            with open(log) as f:
                rows = list(csv.DictReader(f))
            if not rows:
                continue
            pair = f"{config.teacher} -> {config.student}"
            columns = {config.method: float(rows[-1]["test_acc"])}
            for transfer_set in config.transfer_sets:
                probe_file = folder / f"probe-{transfer_set}.json"
                if probe_file.exists():
                    columns[f"{config.method} {transfer_set}"] = json.loads(
                        probe_file.read_text())["test_acc"]
            for column, accuracy in columns.items():
                cells.setdefault((config.table, pair, column), []).append(accuracy)
    if not cells:
        return f"no finished runs under {runs}"
    lines = []
    for table in TABLES:
        keys = [k for k in cells if k[0] == table]
        if not keys:
            continue
        columns = sorted({k[2] for k in keys}, key=lambda c: (
            METHOD_ORDER.index(c.split()[0]), c))
        pairs = list(dict.fromkeys(k[1] for k in keys))
        lines += [f"\n{table} (final test top-1 %, mean +- std over seeds)\n",
                  "| teacher -> student | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for pair in pairs:
            row = []
            for column in columns:
                accs = cells.get((table, pair, column))
                if not accs:
                    row.append("-")
                    continue
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                row.append(f"{statistics.mean(accs):.2f} +- {std:.2f} ({len(accs)})")
            lines.append(f"| {pair} | " + " | ".join(row) + " |")
    return "\n".join(lines).lstrip("\n")


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
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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

    def data_options(p, dataset=True):
        if dataset:
            p.add_argument("--dataset", default="cifar100",
                           choices=["cifar100", "cifar10", "imagenet", "tiny-imagenet", "digits"])
        p.add_argument("--data", default="./data", help="data set root folder")
        p.add_argument("--download", action="store_true", help="fetch CIFAR/STL-10 if missing")
        p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
        p.add_argument("--workers", type=int, default=0, help="data loader processes")

    def training_options(p, dataset=True):
        data_options(p, dataset)
        p.add_argument("--epochs", type=int)
        p.add_argument("--batch-size", type=int, help="global batch (split over torchrun ranks)")
        p.add_argument("--lr", type=float)
        p.add_argument("--lr-decay-epochs", type=int, nargs="+")
        p.add_argument("--weight-decay", type=float)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms (slower on GPU)")
        p.add_argument("--precision", default="fp32", choices=sorted(engine.PRECISIONS),
                       help="autocast dtype (fp16 adds a gradient scaler)")
        p.add_argument("--sync-bn", action="store_true", help="synchronised batch norm (GPUs)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars (default: when stderr is a terminal)")
        p.add_argument("--tensorboard", action="store_true",
                       help="write TensorBoard scalars under OUT/tensorboard")

    def probe_options(p):
        p.add_argument("--image-size", type=int, default=32,
                       help="transfer images are resized to the network's input size")
        p.add_argument("--probe-epochs", type=int, default=40)
        p.add_argument("--probe-batch-size", type=int, default=64)
        p.add_argument("--probe-lr", type=float, default=0.1)
        p.add_argument("--probe-lr-decay-epochs", type=int, nargs="+", default=[20, 30, 35])

    t = sub.add_parser("train-teacher", help="train a model with cross-entropy")
    training_options(t)
    t.add_argument("--out", required=True, help="run folder: checkpoints and log.csv")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--model", required=True)
    t.set_defaults(run=train_teacher)
    s = sub.add_parser("distill", help="train a student from a teacher checkpoint")
    training_options(s)
    s.add_argument("--out", required=True, help="run folder: checkpoints and log.csv")
    s.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
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
    lp = sub.add_parser("linear-probe", help="transfer: linear classifier on frozen features")
    data_options(lp, dataset=False)
    lp.add_argument("--dataset", required=True, choices=["stl10", "tiny-imagenet"])
    lp.add_argument("--model", required=True)
    lp.add_argument("--ckpt", required=True)
    lp.add_argument("--seed", type=int, default=0)
    probe_options(lp)
    lp.set_defaults(run=linear_probe_command)
    c = sub.add_parser("configs", help="list the configs of the paper's tables")
    c.set_defaults(run=list_configs)
    r = sub.add_parser("run", help="run one config of the paper's tables")
    r.add_argument("config", help="e.g. cifar100/resnet56-resnet20/icd_kd (see `configs`)")
    training_options(r, dataset=False)
    probe_options(r)
    r.add_argument("--runs", default="./runs", help="folder of all runs (teachers included)")
    r.add_argument("--out", help="the student's run folder (default: under --runs)")
    r.add_argument("--teacher-ckpt", help="use this teacher instead of training one")
    r.add_argument("--teacher-epochs", type=int, help="override the teacher's epochs")
    r.add_argument("--stl10-data", default="./data", help="STL-10 root (transfer configs)")
    r.add_argument("--tiny-imagenet-data", default="./data/tiny-imagenet-200",
                   help="Tiny-ImageNet image folders (transfer configs)")
    r.set_defaults(run=run_config, resume=True)
    res = sub.add_parser("results", help="the paper's tables from the runs of `run`")
    res.add_argument("--runs", default="./runs")
    res.set_defaults(run=results_command)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except (FileNotFoundError, ValueError, engine.NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        distributed.shutdown(wait_for_all=False)
        return 2
    except BaseException:
        distributed.shutdown(wait_for_all=False)
        raise
    distributed.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
