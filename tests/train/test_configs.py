"""One config per cell of the paper's tables (train/configs.py)."""
import pytest
import torch

from train.cli import main
from train.configs import CONFIGS, TABLES, TABLE_METHODS, applies, get_config
from train.distillers import DISTILLERS
from train.models import build_model, feature_points, model_names

from helpers import COMPARISON, paper_tables, transcribed_pair


def test_every_table_row_has_a_config_per_method():
    rows = {table: len(pairs) for table, (_, pairs) in TABLES.items()}
    assert rows == {"cifar100-same-family": 7, "cifar100-other-family": 6, "imagenet": 3,
                    "transfer": 1}
    # The paper's Table 3: ResNet-34 -> ResNet-18, ResNet-50 -> ResNet-18 and -> MobileNet V1.
    assert TABLES["imagenet"][1] == (("tv_resnet34", "tv_resnet18"),
                                     ("tv_resnet50", "tv_resnet18"),
                                     ("tv_resnet50", "mobilenet_v1"))
    # FSP cannot apply across widths: Table 1's wrn_40_2 -> wrn_40_1, Table 2's column, and
    # both ResNet-50 pairs of Table 3.
    assert len(CONFIGS) == 7 * 20 - 1 + 6 * 19 + rows["imagenet"] * 17 - 2 + 8
    # Every method of the tables is the registry's, but for the three baselines of the
    # paper's later version, which are implemented apart (train/distillers/, by those names).
    named = {m for methods in TABLE_METHODS.values() for m in methods}
    assert named - set(DISTILLERS) <= {"ofd", "wsld", "ipwd"}
    for config in CONFIGS.values():
        assert {config.teacher, config.student} <= set(model_names()), config
    assert get_config("cifar100/resnet32x4-ShuffleV2/icd_kd").student == "ShuffleV2"
    with pytest.raises(ValueError, match="unknown config 'cifar100/resnet56-resnet21/icd'; "
                                         "did you mean cifar100/resnet56-resnet20/icd"):
        get_config("cifar100/resnet56-resnet21/icd")
    with pytest.raises(ValueError) as unrelated:  # a typo is not matched to unrelated names
        get_config("cifar100/resnet32x4-ShuffleV2/ikd")
    assert "cifar100/vgg13-vgg8" not in str(unrelated.value)
    assert "cifar100/resnet32x4-ShuffleV2/kd" in str(unrelated.value)


def test_every_cell_of_the_papers_tables_is_one_config(capsys):
    assert main(["configs"]) == 0
    listed = {line.strip() for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ")}
    assert listed == set(CONFIGS)
    counts = {table: sum(c.table == table for c in CONFIGS.values()) for table in TABLES}
    # 7 pairs x 20 methods less FSP of wrn_40_2 -> wrn_40_1; 6 x 19 (no FSP); 3 x 17 less FSP
    # of both ResNet-50 pairs; 8 transfer methods.
    assert counts == {"cifar100-same-family": 139, "cifar100-other-family": 114,
                      "imagenet": 49, "transfer": 8}
    cifar = ("vanilla", "kd") + COMPARISON + ("crd", "crd_kd", "ofd", "wsld", "ipwd", "icd",
                                              "icd_kd")
    for table in ("cifar100-same-family", "cifar100-other-family"):
        for teacher, student in TABLES[table][1]:
            for method in cifar:
                name = f"cifar100/{teacher}-{student}/{method}"
                # FSP needs equal channels from the stem to the last stage: the paper's n/a.
                applicable = method != "fsp" or (
                    table == "cifar100-same-family" and student != "wrn_40_1")
                assert (name in listed) == applicable, name
    # Table 3: every method the paper prints a row for, n/a cells included (they apply),
    # except FSP across widths.
    for transcribed, cells in paper_tables()["tables"]["table3_imagenet"].items():
        pair = transcribed_pair("imagenet", transcribed)
        printed = {m for m in cells if m != "teacher"}
        configs = {c.method for c in CONFIGS.values()
                   if c.table == "imagenet" and f"{c.teacher}-{c.student}" == pair}
        expected = printed if pair == "tv_resnet34-tv_resnet18" else printed - {"fsp"}
        assert configs == expected, pair
    assert "imagenet/tv_resnet50-tv_resnet18/wsld" in listed  # n/a in the paper: still runs
    transfer = {c.method for c in CONFIGS.values() if c.table == "transfer"}
    assert transfer == {"vanilla", "kd", "at", "fitnet", "crd", "crd_kd", "icd", "icd_kd"}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_fsp_has_a_config_exactly_where_the_widths_match(table):
    dataset, pairs = TABLES[table]
    size = 32 if dataset == "cifar100" else 64
    for teacher, student in pairs:
        widths = []
        for name in (teacher, student):
            model = build_model(name, 10).eval()
            with torch.no_grad():
                points, _ = feature_points(model, torch.zeros(1, 3, size, size))
            widths.append([p.shape[1] for p in points[:-1]])  # the stem and the stages
        assert applies("fsp", teacher, student) == (widths[0] == widths[1]), (teacher, student)
        assert all(applies(m, teacher, student) for m in TABLE_METHODS[table] if m != "fsp")
