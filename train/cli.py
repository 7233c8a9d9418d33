"""Command line of the training application: `python -m train <command>`.

    demo           digits (offline): train a teacher, then students with vanilla, KD, ICD and
                   ICD+KD over several seeds; print top-1 accuracy (mean +- std); draw
                   each method's correlation-difference map and the table's bar chart
    train-teacher  train a model on a data set with the paper's recipe (the defaults)
    distill        train a student from a teacher checkpoint with a method of the registry
    evaluate       top-1 accuracy of a checkpoint on a data set's test split
    linear-probe   transfer: a linear classifier on a frozen checkpoint's features (STL-10,
                   Tiny-ImageNet)
    configs        list the configs, one per row of the paper's tables and method
    run            run one config: the teacher (trained first when its run is missing;
                   its final epoch is distilled from), the student, and for transfer
                   configs the linear probes of the student and (once) of the teacher
    results        the tables, from the finished runs (mean +- std over seeds) beside the
                   paper's values, and its headline (relative improvement over KD); with
                   --out also as Markdown files and bar charts
    sweep          run one config over a grid of one loss weight and seeds; plot top-1
                   against it (the paper's Figure 2)
    correlation    |C_teacher - C_student| of the class-logit correlation matrices on a
                   test split, one heatmap per student (the paper's Figure 1)
    plot           curves of runs from their log.csv: loss terms, test top-1, learning rate

Figures are PNG (--format pdf|svg), each with a JSON of its plotted values beside it.

Data sets: cifar100, cifar10 (--data ROOT, --download), imagenet, tiny-imagenet (image
folders under --data), digits (embedded, offline). Recipes (overridable): CIFAR 240 epochs,
batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), x0.1 at
150/180/210, weight decay 5e-4; ImageNet 100 epochs, batch 256, lr 0.1, x0.1 at 30/60/90,
weight decay 1e-4.

Checkpoints (--teacher-ckpt, --ckpt) may be this application's, the CRD benchmark's,
mdistiller's, torchvision's or bare state dicts; they are read safely (weights_only) unless
--trust-checkpoint is given. --teachers DIR takes the CRD benchmark's published teachers
(DIR/<teacher>_vanilla/ckpt_epoch_240.pth) instead of training one.

Multi-GPU / multi-node: start train-teacher, distill or run under torchrun (e.g.
`torchrun --nproc_per_node 8 -m train distill ...`); --batch-size stays the global batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import distributed, engine
from .checkpoints import load_model
from .configs import CONFIGS, TABLES
from .data.catalog import TRAINING_SETS, TRANSFER_SETS, load_data
from .demo import DEMO_METHODS, demo
from .distillers import DISTILLERS
from .figures.correlation import correlation_command
from .figures.curves import plot_command
from .figures.output import FORMATS
from .sweeps import SWEEP_PARAMETERS, sweep_command
from .figures.tables import write_table_files
from .probe import probe_checkpoint
from .recipes import INIT_STAGE_EPOCHS
from .results import collect_tables, results_tables
from .run_folder import FINAL, LAST, LOG, TEACHER_CHECKPOINTS
from .runs import run_config
from .teachers import PUBLISHED_LAYOUT, load_teacher
from .training import loss_weight_options, run_training


def train_teacher(args) -> int:
    data = load_data(args.dataset, args.data, args.download)
    run_training(args, "vanilla", args.model, data, Path(args.out))
    return 0


def distill(args) -> int:
    data = load_data(args.dataset, args.data, args.download)
    teacher = load_teacher(args.teacher, data, args.teacher_ckpt, args.teachers,
                           args.trust_checkpoint, args.device)
    run_training(args, args.method, args.student, data, Path(args.out), teacher,
                 method_options=loss_weight_options(args))
    return 0


def evaluate_command(args) -> int:
    device = distributed.init_from_env(args.device)
    _, test_set, classes, channels = load_data(args.dataset, args.data, args.download)
    model = load_model(args.model, args.ckpt, classes, channels, args.trust_checkpoint)
    accuracy = engine.evaluate(model.to(device), test_set, num_workers=args.workers)
    distributed.say(f"{args.model} ({args.ckpt}): test top-1 {accuracy:.2f}%")
    return 0


def linear_probe_command(args) -> int:
    probe_checkpoint(args.model, args.ckpt, args.dataset, args.data, args)
    return 0


def list_configs(args) -> int:
    for table, (dataset, pairs) in TABLES.items():
        print(f"{table} (trained on {dataset}):")
        for name, config in CONFIGS.items():
            if config.table == table:
                print(f"  {name}")
    return 0


def results_command(args) -> int:
    tables = collect_tables(Path(args.runs))  # every run folder's log, read once
    print(results_tables(Path(args.runs), tables))
    if args.out:
        for path in write_table_files(tables, args.out, args.format):
            print(f"wrote {path}")
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
    d.add_argument("--figures", default="runs/demo/figures",
                   help="folder of the correlation maps and the table's bar chart")
    d.add_argument("--format", default="png", choices=FORMATS)
    d.set_defaults(run=demo)

    def data_options(p, dataset=True):
        if dataset:
            p.add_argument("--dataset", default="cifar100",
                           choices=list(TRAINING_SETS))
        p.add_argument("--data", default="./data", help="data set root folder")
        p.add_argument("--download", action="store_true", help="fetch CIFAR/STL-10 if missing")
        p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
        p.add_argument("--workers", type=int, default=0, help="data loader processes")

    def trust_option(p):
        p.add_argument("--trust-checkpoint", action="store_true",
                       help="load checkpoints that need Python globals beyond tensors (full "
                            "unpickling, weights_only=False): only files from a source you "
                            "trust, since unpickling can run code the file carries")

    def teacher_sources(p, required):
        source = p.add_mutually_exclusive_group(required=required)
        source.add_argument("--teacher-ckpt", help="the teacher's checkpoint (this "
                            "application's, the CRD benchmark's, mdistiller's, a state dict)")
        source.add_argument("--teachers", metavar="DIR",
                            help="folder of the CRD benchmark's published teachers: takes "
                                 f"DIR/{PUBLISHED_LAYOUT}")

    def training_options(p, dataset=True):
        data_options(p, dataset)
        trust_option(p)
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
        p.add_argument("--overwrite", action="store_true",
                       help="replace a run already in the run folder (without it, a run "
                            "there is only continued, with --resume)")

    def loss_weight_arguments(p):
        w = p.add_argument_group("loss weights (default: the method's own, as in the paper)")
        w.add_argument("--gamma", type=float, help="weight of the cross-entropy on the labels")
        w.add_argument("--kd-weight", "--lambda", dest="kd_weight", type=float,
                       help="weight of Hinton's KD (T = 4)")
        w.add_argument("--beta", type=float, help="weight of the method's own loss")
        w.add_argument("--alpha", type=float, help="ICD: weight of the invariance (KL) term")
        w.add_argument("--init-epochs", type=int, default=INIT_STAGE_EPOCHS,
                       help="epochs of the initialisation stage of AB, FT and FSP "
                            f"(default {INIT_STAGE_EPOCHS}, as in the CRD benchmark)")

    def probe_options(p):
        p.add_argument("--image-size", type=int, default=32,
                       help="transfer images are resized to the network's input size")
        p.add_argument("--probe-epochs", type=int, default=40)
        p.add_argument("--probe-batch-size", type=int, default=64)
        p.add_argument("--probe-lr", type=float, default=0.1)
        p.add_argument("--probe-lr-decay-epochs", type=int, nargs="+", default=[20, 30, 35])

    t = sub.add_parser("train-teacher", help="train a model with cross-entropy")
    training_options(t)
    t.add_argument("--out", required=True, help=f"run folder: checkpoints and {LOG}")
    t.add_argument("--resume", action="store_true", help=f"continue from OUT/{LAST}")
    t.add_argument("--model", required=True)
    t.set_defaults(run=train_teacher)
    s = sub.add_parser("distill", help="train a student from a teacher checkpoint")
    training_options(s)
    s.add_argument("--out", required=True, help=f"run folder: checkpoints and {LOG}")
    s.add_argument("--resume", action="store_true", help=f"continue from OUT/{LAST}")
    s.add_argument("--teacher", required=True)
    teacher_sources(s, required=True)
    s.add_argument("--student", required=True)
    s.add_argument("--method", default="icd_kd", choices=sorted(DISTILLERS))
    loss_weight_arguments(s)
    s.set_defaults(run=distill)
    e = sub.add_parser("evaluate", help="test accuracy of a checkpoint")
    data_options(e)
    e.add_argument("--model", required=True)
    e.add_argument("--ckpt", required=True)
    trust_option(e)
    e.set_defaults(run=evaluate_command)
    lp = sub.add_parser("linear-probe", help="transfer: linear classifier on frozen features")
    data_options(lp, dataset=False)
    lp.add_argument("--dataset", required=True, choices=list(TRANSFER_SETS))
    lp.add_argument("--model", required=True)
    lp.add_argument("--ckpt", required=True)
    trust_option(lp)
    lp.add_argument("--seed", type=int, default=0)
    probe_options(lp)
    lp.set_defaults(run=linear_probe_command)
    c = sub.add_parser("configs", help="list the configs of the paper's tables")
    c.set_defaults(run=list_configs)
    def config_run_options(p):
        p.add_argument("config", help="e.g. cifar100/resnet56-resnet20/icd_kd (see `configs`)")
        training_options(p, dataset=False)
        loss_weight_arguments(p)
        probe_options(p)
        p.add_argument("--runs", default="./runs", help="folder of all runs (teachers included)")
        teacher_sources(p, required=False)  # neither: the teacher is trained first
        p.add_argument("--teacher-epochs", type=int, help="override the teacher's epochs")
        p.add_argument("--teacher-epoch", default="final", choices=list(TEACHER_CHECKPOINTS),
                       help="which checkpoint of the teacher `run` trained is distilled from: "
                            "its final epoch (default, as the CRD benchmark's published "
                            "teachers), or its epoch of best test accuracy (selected on the "
                            "test split the tables report)")
        p.add_argument("--stl10-data", default="./data", help="STL-10 root (transfer configs)")
        p.add_argument("--tiny-imagenet-data", default="./data/tiny-imagenet-200",
                       help="Tiny-ImageNet image folders (transfer configs)")
        p.set_defaults(resume=True)

    r = sub.add_parser("run", help="run one config of the paper's tables")
    config_run_options(r)
    r.add_argument("--out", help="the student's run folder (default: under --runs)")
    r.set_defaults(run=run_config)
    res = sub.add_parser("results", help="the paper's tables from the runs of `run`")
    res.add_argument("--runs", default="./runs")
    res.add_argument("--out", help="also write each table as TABLE.md and a bar chart here")
    res.add_argument("--format", default="png", choices=FORMATS)
    res.set_defaults(run=results_command)
    sw = sub.add_parser("sweep", help="run a config over a grid of one loss weight; plot top-1",
                        description="Runs CONFIG once per value and seed, each in the run "
                        "folder `run` would use with that weight (finished runs are not "
                        "retrained), then plots top-1 (mean +- std over seeds) against the "
                        "value. Default grids: " + "; ".join(
                            f"{name} {' '.join(f'{v:g}' for v in p.grid)}"
                            for name, p in SWEEP_PARAMETERS.items()))
    config_run_options(sw)
    sw.add_argument("--param", required=True, choices=list(SWEEP_PARAMETERS),
                    help="the swept loss weight (lambda = kd-weight)")
    sw.add_argument("--values", type=float, nargs="+", help="default: the paper's grid")
    sw.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sw.add_argument("--plot-only", action="store_true",
                    help="train nothing: plot the runs that exist")
    sw.add_argument("--figures", help="figure folder (default: RUNS/figures)")
    sw.add_argument("--format", default="png", choices=FORMATS)
    sw.set_defaults(run=sweep_command)
    co = sub.add_parser("correlation", help="teacher/student class-logit correlation maps")
    data_options(co)
    trust_option(co)
    co.add_argument("--teacher-ckpt", required=True, help="checkpoint or run folder")
    co.add_argument("--teacher", help="teacher architecture (default: from run folder names)")
    co.add_argument("--student", nargs="+", required=True,
                    help=f"checkpoints or run folders (a run folder's {FINAL}: its final epoch)")
    co.add_argument("--student-model", nargs="+",
                    help="student architecture(s), where run folder names do not say")
    co.add_argument("--labels", nargs="+", help="panel titles (default: each run's method)")
    co.add_argument("--batch-size", type=int, default=256)
    co.add_argument("--out", default="./figures", help="figure folder")
    co.add_argument("--format", default="png", choices=FORMATS)
    co.set_defaults(run=correlation_command)
    pl = sub.add_parser("plot", help=f"curves of runs from their {LOG}, on one figure")
    pl.add_argument("runs", nargs="+", help="run folders")
    pl.add_argument("--out", default="./figures", help="figure folder")
    pl.add_argument("--name", help="file name part (default: the runs' labels)")
    pl.add_argument("--format", default="png", choices=FORMATS)
    pl.set_defaults(run=plot_command)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
    except (FileNotFoundError, ValueError, engine.NonFiniteLoss) as error:
        print(f"error: {error}", file=sys.stderr)
        distributed.shutdown(wait_for_all=False)
        return 2
    except OSError as error:  # an output path that cannot be written: a full disk, no right
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        distributed.shutdown(wait_for_all=False)
        return 2
    except BaseException:
        distributed.shutdown(wait_for_all=False)
        raise
    distributed.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
