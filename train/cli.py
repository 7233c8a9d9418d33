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
folders under --data), digits (embedded, offline).
{recipes}

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
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from . import distributed, engine
from .checkpoints import load_model
from .configs import CONFIGS, TABLES
from .data.catalog import TRAINING_SETS, TRANSFER_SETS, load_data
from .demo import DEMO_METHODS, demo
from .distillers import DISTILLERS
from .figures.correlation import correlation_command
from .figures.curves import plot_curves
from .figures.output import FORMATS
from .figures.tables import write_table_files
from .options import (CorrelationRequest, DataSource, DemoOptions, LossWeights, ProbeRecipe,
                      RecipeOverrides, RunPlan, Session, SweepRequest, TrainingRequest)
from .probe import probe_checkpoint
from .recipes import INIT_STAGE_EPOCHS, describe_recipes
from .results import collect_tables, results_tables
from .run_folder import FINAL, LAST, LOG, TEACHER_CHECKPOINTS
from .runs import run_config
from .sweeps import SWEEP_PARAMETERS, sweep_command
from .teachers import PUBLISHED_LAYOUT, load_teacher
from .training import run_training


# ---- option groups that several commands share ----

def add_data_options(p, dataset=True):
    if dataset:
        p.add_argument("--dataset", default="cifar100", choices=list(TRAINING_SETS))
    p.add_argument("--data", default="./data", help="data set root folder")
    p.add_argument("--download", action="store_true", help="fetch CIFAR/STL-10 if missing")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")


def add_trust_option(p):
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoints that need Python globals beyond tensors (full "
                        "unpickling, weights_only=False): only files from a source you "
                        "trust, since unpickling can run code the file carries")


def add_teacher_sources(p, required):
    source = p.add_mutually_exclusive_group(required=required)
    source.add_argument("--teacher-ckpt", help="the teacher's checkpoint (this "
                        "application's, the CRD benchmark's, mdistiller's, a state dict)")
    source.add_argument("--teachers", metavar="DIR",
                        help="folder of the CRD benchmark's published teachers: takes "
                             f"DIR/{PUBLISHED_LAYOUT}")


def add_training_options(p, dataset=True):
    add_data_options(p, dataset)
    add_trust_option(p)
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


def add_run_folder_options(p):
    p.add_argument("--out", required=True, help=f"run folder: checkpoints and {LOG}")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{LAST}")


def add_loss_weight_options(p):
    w = p.add_argument_group("loss weights (default: the method's own, as in the paper)")
    w.add_argument("--gamma", type=float, help="weight of the cross-entropy on the labels")
    w.add_argument("--kd-weight", "--lambda", dest="kd_weight", type=float,
                   help="weight of Hinton's KD (T = 4)")
    w.add_argument("--beta", type=float, help="weight of the method's own loss")
    w.add_argument("--alpha", type=float, help="ICD: weight of the invariance (KL) term")
    w.add_argument("--init-epochs", type=int, default=INIT_STAGE_EPOCHS,
                   help="epochs of the initialisation stage of AB, FT and FSP "
                        f"(default {INIT_STAGE_EPOCHS}, as in the CRD benchmark)")


def add_probe_options(p):
    p.add_argument("--image-size", type=int, default=32,
                   help="transfer images are resized to the network's input size")
    p.add_argument("--probe-epochs", type=int, default=40)
    p.add_argument("--probe-batch-size", type=int, default=64)
    p.add_argument("--probe-lr", type=float, default=0.1)
    p.add_argument("--probe-lr-decay-epochs", type=int, nargs="+", default=[20, 30, 35])


def add_config_run_options(p):
    p.add_argument("config", help="e.g. cifar100/resnet56-resnet20/icd_kd (see `configs`)")
    add_training_options(p, dataset=False)
    add_loss_weight_options(p)
    add_probe_options(p)
    p.add_argument("--runs", default="./runs", help="folder of all runs (teachers included)")
    add_teacher_sources(p, required=False)  # neither: the teacher is trained first
    p.add_argument("--teacher-epochs", type=int, help="override the teacher's epochs")
    p.add_argument("--teacher-epoch", default="final", choices=list(TEACHER_CHECKPOINTS),
                   help="which checkpoint of the teacher `run` trained is distilled from: "
                        "its final epoch (default, as the CRD benchmark's published "
                        "teachers), or its epoch of best test accuracy (selected on the "
                        "test split the tables report)")
    p.add_argument("--stl10-data", default="./data", help="STL-10 root (transfer configs)")
    p.add_argument("--tiny-imagenet-data", default="./data/tiny-imagenet-200",
                   help="Tiny-ImageNet image folders (transfer configs)")


# ---- the door: a Namespace becomes typed, frozen values ----

def training_session(args) -> Session:
    return Session(device=args.device, seed=args.seed, deterministic=args.deterministic,
                   precision=args.precision, workers=args.workers,
                   progress=sys.stderr.isatty() if args.progress is None else args.progress,
                   tensorboard=args.tensorboard, trust_checkpoint=args.trust_checkpoint,
                   sync_bn=args.sync_bn)


def recipe_overrides(args) -> RecipeOverrides:
    return RecipeOverrides(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_decay_epochs=None if args.lr_decay_epochs is None else tuple(args.lr_decay_epochs),
        weight_decay=args.weight_decay)


def loss_weights(args) -> LossWeights:
    return LossWeights(gamma=args.gamma, kd_weight=args.kd_weight, beta=args.beta,
                       alpha=args.alpha)


def probe_recipe(args) -> ProbeRecipe:
    return ProbeRecipe(epochs=args.probe_epochs, batch_size=args.probe_batch_size,
                       lr=args.probe_lr, lr_decay_epochs=tuple(args.probe_lr_decay_epochs),
                       seed=args.seed, num_workers=args.workers)


def run_plan(args, out: Optional[str] = None) -> RunPlan:
    return RunPlan(config=args.config, runs=Path(args.runs), data_root=args.data,
                   download=args.download, session=training_session(args),
                   recipe=recipe_overrides(args), loss_weights=loss_weights(args),
                   init_epochs=args.init_epochs, overwrite=args.overwrite,
                   out=Path(out) if out else None,
                   teacher_checkpoint=args.teacher_ckpt, published_teachers=args.teachers,
                   teacher_epochs=args.teacher_epochs, teacher_epoch=args.teacher_epoch,
                   probe=probe_recipe(args), probe_image_size=args.image_size,
                   stl10_data=args.stl10_data, tiny_imagenet_data=args.tiny_imagenet_data)


# ---- the commands: each adds its options and starts from its typed values ----

def add_demo_options(p):
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--student-fraction", type=float, default=0.1,
                   help="share of the training split the students learn from")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--figures", default="runs/demo/figures",
                   help="folder of the correlation maps and the table's bar chart")
    p.add_argument("--format", default="png", choices=FORMATS)


def start_demo(args) -> int:
    return demo(DemoOptions(
        teacher=args.teacher, student=args.student, image_size=args.image_size,
        teacher_epochs=args.teacher_epochs, epochs=args.epochs,
        student_fraction=args.student_fraction, seeds=args.seeds, batch_size=args.batch_size,
        lr=args.lr, methods=tuple(args.methods), threads=args.threads, figures=args.figures,
        format=args.format))


def add_train_teacher_options(p):
    add_training_options(p)
    add_run_folder_options(p)
    p.add_argument("--model", required=True)


def start_train_teacher(args) -> int:
    request = TrainingRequest(dataset=args.dataset, model=args.model, method="vanilla",
                              out=Path(args.out), session=training_session(args),
                              recipe=recipe_overrides(args), resume=args.resume,
                              overwrite=args.overwrite)
    run_training(request, load_data(args.dataset, args.data, args.download))
    return 0


def add_distill_options(p):
    add_training_options(p)
    add_run_folder_options(p)
    p.add_argument("--teacher", required=True)
    add_teacher_sources(p, required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--method", default="icd_kd", choices=sorted(DISTILLERS))
    add_loss_weight_options(p)


def start_distill(args) -> int:
    request = TrainingRequest(dataset=args.dataset, model=args.student, method=args.method,
                              out=Path(args.out), session=training_session(args),
                              recipe=recipe_overrides(args), loss_weights=loss_weights(args),
                              init_epochs=args.init_epochs, resume=args.resume,
                              overwrite=args.overwrite, teacher=args.teacher)
    data = load_data(args.dataset, args.data, args.download)
    teacher = load_teacher(args.teacher, data, args.teacher_ckpt, args.teachers,
                           args.trust_checkpoint, args.device)
    run_training(request, data, teacher)
    return 0


def add_evaluate_options(p):
    add_data_options(p)
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    add_trust_option(p)


def start_evaluate(args) -> int:
    device = distributed.init_from_env(args.device)
    _, test_set, classes, channels = load_data(args.dataset, args.data, args.download)
    model = load_model(args.model, args.ckpt, classes, channels, args.trust_checkpoint)
    accuracy = engine.evaluate(model.to(device), test_set, num_workers=args.workers)
    distributed.say(f"{args.model} ({args.ckpt}): test top-1 {accuracy:.2f}%")
    return 0


def add_linear_probe_options(p):
    add_data_options(p, dataset=False)
    p.add_argument("--dataset", required=True, choices=list(TRANSFER_SETS))
    p.add_argument("--model", required=True)
    p.add_argument("--ckpt", required=True)
    add_trust_option(p)
    p.add_argument("--seed", type=int, default=0)
    add_probe_options(p)


def start_linear_probe(args) -> int:
    session = Session(device=args.device, seed=args.seed, workers=args.workers,
                      trust_checkpoint=args.trust_checkpoint)
    probe_checkpoint(args.model, args.ckpt, args.dataset, args.data, args.image_size,
                     probe_recipe(args), session, args.download)
    return 0


def add_no_options(p):
    pass


def start_configs(args) -> int:
    for table, (dataset, pairs) in TABLES.items():
        print(f"{table} (trained on {dataset}):")
        for name, config in CONFIGS.items():
            if config.table == table:
                print(f"  {name}")
    return 0


def add_run_options(p):
    add_config_run_options(p)
    p.add_argument("--out", help="the student's run folder (default: under --runs)")


def start_run(args) -> int:
    return run_config(run_plan(args, args.out))


def add_results_options(p):
    p.add_argument("--runs", default="./runs")
    p.add_argument("--out", help="also write each table as TABLE.md and a bar chart here")
    p.add_argument("--format", default="png", choices=FORMATS)


def start_results(args) -> int:
    tables = collect_tables(Path(args.runs))  # every run folder's log, read once
    print(results_tables(Path(args.runs), tables))
    if args.out:
        for path in write_table_files(tables, args.out, args.format):
            print(f"wrote {path}")
    return 0


def add_sweep_options(p):
    add_config_run_options(p)
    p.add_argument("--param", required=True, choices=list(SWEEP_PARAMETERS),
                   help="the swept loss weight (lambda = kd-weight)")
    p.add_argument("--values", type=float, nargs="+", help="default: the paper's grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plot-only", action="store_true",
                   help="train nothing: plot the runs that exist")
    p.add_argument("--figures", help="figure folder (default: RUNS/figures)")
    p.add_argument("--format", default="png", choices=FORMATS)


def start_sweep(args) -> int:
    return sweep_command(SweepRequest(
        plan=run_plan(args), param=args.param, values=tuple(args.values or ()),
        seeds=tuple(args.seeds), plot_only=args.plot_only,
        figures=Path(args.figures) if args.figures else None, format=args.format))


def add_correlation_options(p):
    add_data_options(p)
    add_trust_option(p)
    p.add_argument("--teacher-ckpt", required=True, help="checkpoint or run folder")
    p.add_argument("--teacher", help="teacher architecture (default: from run folder names)")
    p.add_argument("--student", nargs="+", required=True,
                   help=f"checkpoints or run folders (a run folder's {FINAL}: its final epoch)")
    p.add_argument("--student-model", nargs="+",
                   help="student architecture(s), where run folder names do not say")
    p.add_argument("--labels", nargs="+", help="panel titles (default: each run's method)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="./figures", help="figure folder")
    p.add_argument("--format", default="png", choices=FORMATS)


def start_correlation(args) -> int:
    def optional_tuple(values):
        return None if values is None else tuple(values)

    return correlation_command(CorrelationRequest(
        teacher_checkpoint=args.teacher_ckpt, students=tuple(args.student),
        data=DataSource(args.dataset, args.data, args.download),
        session=Session(device=args.device, workers=args.workers,
                        trust_checkpoint=args.trust_checkpoint),
        teacher=args.teacher, student_models=optional_tuple(args.student_model),
        labels=optional_tuple(args.labels), batch_size=args.batch_size, out=args.out,
        format=args.format))


def add_plot_options(p):
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="./figures", help="figure folder")
    p.add_argument("--name", help="file name part (default: the runs' labels)")
    p.add_argument("--format", default="png", choices=FORMATS)


def start_plot(args) -> int:
    path = plot_curves(args.runs, args.out, args.format, args.name)
    print(f"figure: {path}")
    return 0


@dataclass(frozen=True)
class Command:
    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    start: Callable[[argparse.Namespace], int]  # converts the Namespace, then runs
    description: Optional[str] = None


SWEEP_DESCRIPTION = (
    "Runs CONFIG once per value and seed, each in the run folder `run` would use with that "
    "weight (finished runs are not retrained), then plots top-1 (mean +- std over seeds) "
    "against the value. Default grids: " + "; ".join(
        f"{name} {' '.join(f'{v:g}' for v in p.grid)}" for name, p in SWEEP_PARAMETERS.items()))

COMMANDS: Dict[str, Command] = {
    "demo": Command("offline digits demo: teacher, then four student methods",
                    add_demo_options, start_demo),
    "train-teacher": Command("train a model with cross-entropy", add_train_teacher_options,
                             start_train_teacher),
    "distill": Command("train a student from a teacher checkpoint", add_distill_options,
                       start_distill),
    "evaluate": Command("test accuracy of a checkpoint", add_evaluate_options, start_evaluate),
    "linear-probe": Command("transfer: linear classifier on frozen features",
                            add_linear_probe_options, start_linear_probe),
    "configs": Command("list the configs of the paper's tables", add_no_options,
                       start_configs),
    "run": Command("run one config of the paper's tables", add_run_options, start_run),
    "results": Command("the paper's tables from the runs of `run`", add_results_options,
                       start_results),
    "sweep": Command("run a config over a grid of one loss weight; plot top-1",
                     add_sweep_options, start_sweep, SWEEP_DESCRIPTION),
    "correlation": Command("teacher/student class-logit correlation maps",
                           add_correlation_options, start_correlation),
    "plot": Command(f"curves of runs from their {LOG}, on one figure", add_plot_options,
                    start_plot),
}


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.replace("{recipes}", textwrap.fill(describe_recipes(), width=90))
    parser = argparse.ArgumentParser(prog="python -m train", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description)
        command.add_options(p)
        p.set_defaults(start=command.start)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.start(args)
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
