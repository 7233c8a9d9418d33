"""`demo`: the main job on the embedded digits data, offline: a teacher, then students of
several methods over several seeds, and their top-1 accuracy (mean +- std); then the figures:
each method's |C_teacher - C_student| of the class-logit correlations on the test split (its
first seed's student) and a bar chart of the table."""
from __future__ import annotations

import time

import torch

from . import engine
from .data.digits import IN_CHANNELS, NUM_CLASSES, digits_datasets, stratified_subset
from .distillers import DISTILLERS
from .figures.correlation import (correlation_differences, logit_correlations,
                                  plot_correlation_differences)
from .figures.tables import plot_table
from .models import build_model
from .options import DemoOptions
from .results import Cell, ResultTable
from .stats import mean_and_std
from .training import train_model

DEMO_METHODS = ("vanilla", "kd", "icd", "icd_kd")


def check_demo_options(options: DemoOptions) -> None:
    """Every option checked before the teacher trains (minutes of work otherwise lost)."""
    for option, smallest in (("threads", 0), ("seeds", 1), ("epochs", 1),
                             ("teacher_epochs", 1), ("batch_size", 1), ("image_size", 1)):
        if getattr(options, option) < smallest:
            raise ValueError(f"--{option.replace('_', '-')} must be >= {smallest}, got "
                             f"{getattr(options, option)}")
    if not 0 < options.student_fraction <= 1:
        raise ValueError(f"--student-fraction must be in (0, 1], got {options.student_fraction}")
    unknown = [m for m in options.methods if m not in DISTILLERS]
    if unknown:
        raise ValueError(f"--methods: unknown method {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(sorted(DISTILLERS))}")


def demo(options: DemoOptions) -> int:
    check_demo_options(options)
    start = time.time()
    if options.threads:
        torch.set_num_threads(options.threads)
    train_set, test_set = digits_datasets(image_size=options.image_size)
    # The teacher learns from the whole training split, the students from a small part of
    # it: the regime where what a teacher passes on shows in the students' accuracy.
    student_set = stratified_subset(train_set, options.student_fraction, seed=0)
    print(f"digits: {len(train_set)} train ({len(student_set)} for the students) / "
          f"{len(test_set)} test images, {options.image_size}x{options.image_size}; "
          f"teacher {options.teacher}, student {options.student}")
    engine.seed_everything(0)
    def cosine(epochs):
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    teacher = build_model(options.teacher, NUM_CLASSES, IN_CHANNELS)
    teacher_settings = engine.LoopSettings(epochs=options.teacher_epochs,
                                        batch_size=options.batch_size)
    _, t_hist = train_model("vanilla", teacher, None, train_set, test_set, teacher_settings,
                            options.lr, 5e-4, cosine(options.teacher_epochs))
    print(f"teacher {options.teacher}: {t_hist.rows[-1]['test_acc']:.2f}% "
          f"({time.time() - start:.0f} s)", flush=True)
    results = {}
    first_students = {}  # method -> its first seed's student, for the correlation maps
    for method in options.methods:
        accs = []
        for seed in range(options.seeds):
            engine.seed_everything(seed + 1)
            student = build_model(options.student, NUM_CLASSES, IN_CHANNELS)
            settings = engine.LoopSettings(epochs=options.epochs, batch_size=options.batch_size,
                                        seed=seed + 1)
            _, hist = train_model(method, student, teacher if method != "vanilla" else None,
                                  student_set, test_set, settings, options.lr, 5e-4,
                                  cosine(options.epochs))
            accs.append(hist.rows[-1]["test_acc"])
            first_students.setdefault(method, student)
        results[method] = accs
        mean, std = mean_and_std(accs)
        print(f"{method:>8}: {mean:6.2f} +- {std:4.2f} % top-1 over {len(accs)} seeds "
              f"({time.time() - start:.0f} s)", flush=True)
    print("\n| method | top-1 % (mean +- std) |\n|---|---|")
    for method, accs in results.items():
        mean, std = mean_and_std(accs)
        print(f"| {method} | {mean:.2f} +- {std:.2f} |")
    demo_figures(options, teacher, first_students, results, test_set)
    print(f"total {time.time() - start:.0f} s")
    return 0


def demo_figures(options: DemoOptions, teacher, students, results, test_set) -> None:
    started = time.time()
    teacher_corr, *student_corrs = logit_correlations([teacher, *students.values()], test_set,
                                                      NUM_CLASSES)
    differences = correlation_differences(teacher_corr, student_corrs, list(students))
    maps = plot_correlation_differences(differences, teacher_corr, "digits", options.teacher,
                                        options.figures, options.format)
    print("\nmean |C_teacher - C_student| (off-diagonal; class-logit correlations on the "
          "digits test split, each method's first seed):")
    for d in differences:
        print(f"{d.label:>8}: {d.mean_abs:.4f} (max {d.max_abs:.4f})")
    pair = f"{options.teacher} -> {options.student}"
    table = ResultTable(name="digits-demo", rows=[pair], columns=list(results),
                        cells={(pair, m): Cell(measured=accs) for m, accs in results.items()})
    chart = plot_table(table, options.figures, options.format)
    print(f"figures: {maps}\n         {chart} ({time.time() - started:.1f} s)")
