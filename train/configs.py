"""One config per cell of the paper's tables: a teacher/student pair and a method, run by
`python -m train run <name>` (train/cli.py), e.g. `cifar100/resnet56-resnet20/icd_kd`.

The tables are the ICD paper's (train/published_results.json): CIFAR-100 students of the
teacher's family (Table 1) and of another family (Table 2), ImageNet (Table 3), and the
transfer of CIFAR-100 students' features to STL-10 and Tiny-ImageNet by a linear probe
(Table 4). Each table's methods are the rows the paper prints for it:
- Tables 1-2: the student alone (vanilla), KD, the 11 feature methods of the CRD benchmark,
  CRD, CRD+KD, OFD, WSLD, IPWD, ICD and ICD+KD.
- Table 3: vanilla, KD, AT, SP, CC, VID, RKD, AB, FT, FSP, NST, CRD, OFD, WSLD, IPWD, ICD and
  ICD+KD (no FitNet, PKT or CRD+KD).
- Table 4: vanilla, KD, AT, FitNet, CRD, CRD+KD, ICD and ICD+KD.
A cell the paper leaves unreported ("n/a") where the method applies is still a config. A
method that cannot apply to a pair has none: FSP compares the flow matrices of teacher and
student point by point, so it needs equal channels from the stem to the last stage, which
holds only for pairs of one width (tests/train/test_results.py checks the pairs against the
models' channels). OFD, WSLD and IPWD are named here as the registry names them
(train.distillers); a config of a method the registry lacks is listed but its `run` fails.
"""
from __future__ import annotations

import difflib

from dataclasses import dataclass
from typing import Dict, FrozenSet, Tuple

from .data.catalog import TRANSFER_SETS

CIFAR_METHODS = ("vanilla", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft",
                 "fsp", "nst", "crd", "crd_kd", "ofd", "wsld", "ipwd", "icd", "icd_kd")
IMAGENET_METHODS = ("vanilla", "kd", "at", "sp", "cc", "vid", "rkd", "ab", "ft", "fsp", "nst",
                    "crd", "ofd", "wsld", "ipwd", "icd", "icd_kd")
TRANSFER_METHODS = ("vanilla", "kd", "at", "fitnet", "crd", "crd_kd", "icd", "icd_kd")

TABLES: Dict[str, Tuple[str, Tuple[Tuple[str, str], ...]]] = {
    # table: (training data set, (teacher, student) rows)
    "cifar100-same-family": ("cifar100", (
        ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
        ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
        ("vgg13", "vgg8"))),
    "cifar100-other-family": ("cifar100", (
        ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
        ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))),
    # Table 3: "MobileNet" is MobileNet V1, as in the ImageNet distillation literature.
    "imagenet": ("imagenet", (("tv_resnet34", "tv_resnet18"), ("tv_resnet50", "tv_resnet18"),
                              ("tv_resnet50", "mobilenet_v1"))),
    # Students distilled on CIFAR-100, then probed on both transfer sets.
    "transfer": ("cifar100", (("wrn_40_2", "wrn_16_2"),)),
}
TABLE_METHODS: Dict[str, Tuple[str, ...]] = {
    "cifar100-same-family": CIFAR_METHODS, "cifar100-other-family": CIFAR_METHODS,
    "imagenet": IMAGENET_METHODS, "transfer": TRANSFER_METHODS}

# method -> the (teacher, student) pairs it cannot apply to (no config): FSP where teacher and
# student differ in width at some point.
INAPPLICABLE: Dict[str, FrozenSet[Tuple[str, str]]] = {
    "fsp": frozenset({("wrn_40_2", "wrn_40_1"), *TABLES["cifar100-other-family"][1],
                      ("tv_resnet50", "tv_resnet18"), ("tv_resnet50", "mobilenet_v1")}),
}


def applies(method: str, teacher: str, student: str) -> bool:
    return (teacher, student) not in INAPPLICABLE.get(method, frozenset())


@dataclass(frozen=True)
class RunConfig:
    table: str
    dataset: str
    teacher: str
    student: str
    method: str

    @property
    def name(self) -> str:
        prefix = "transfer" if self.table == "transfer" else self.dataset
        return f"{prefix}/{self.teacher}-{self.student}/{self.method}"

    @property
    def transfer_sets(self) -> Tuple[str, ...]:
        return TRANSFER_SETS if self.table == "transfer" else ()


CONFIGS: Dict[str, RunConfig] = {
    c.name: c for table, (dataset, pairs) in TABLES.items()
    for teacher, student in pairs for method in TABLE_METHODS[table]
    if applies(method, teacher, student)
    for c in [RunConfig(table, dataset, teacher, student, method)]
}


def get_config(name: str) -> RunConfig:
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, CONFIGS, n=5, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}" if close else ""
        raise ValueError(f"unknown config {name!r}{hint}; `python -m train configs` lists "
                         f"all {len(CONFIGS)}")
    return CONFIGS[name]
