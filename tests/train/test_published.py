"""The paper's published values (train/published.py) against its transcription, cell for cell,
and its headline."""
import pytest

from train.configs import TABLES
from train.published import PAPER, published_headline, published_tables, published_value, sources
from train.results import collect_tables, headline

from helpers import TRANSCRIBED, paper_tables, transcribed_pair


def test_published_values_are_the_papers_cell_for_cell():
    tables = published_tables()
    seen = 0
    for transcribed, table in TRANSCRIBED.items():
        assert set(tables[table]) == {f"{t}-{s}" for t, s in TABLES[table][1]}
        for pair, cells in paper_tables()["tables"][transcribed].items():
            name = transcribed_pair(table, pair)
            teacher, student = name.split("-")
            assert set(tables[table][name]) == set(cells), (table, name)
            for method, cell in cells.items():
                assert published_value(table, teacher, student, method) == cell["value"]
                seen += 1
    probes = paper_tables()["tables"]["table4_transfer_wrn_40_2-wrn_16_2"]
    for transcribed_set, transfer_set in (("stl10", "stl10"), ("tiny_imagenet", "tiny-imagenet")):
        for method, cell in probes[transcribed_set].items():
            assert published_value("transfer", "wrn_40_2", "wrn_16_2",
                                   f"{method} {transfer_set}") == cell["value"]
            seen += 1
    assert seen == 7 * 21 + 6 * 20 + 3 * 18 + 2 * 9
    # The cells where other publications print another number are theirs, named.
    assert published_value("cifar100-same-family", "vgg13", "vgg8", "cc") == 70.81
    assert published_value("cifar100-same-family", "vgg13", "vgg8", "cc", "crd-paper") == 70.71
    assert published_value("cifar100-other-family", "wrn_40_2", "ShuffleV1", "nst") == 76.09
    assert published_value("cifar100-other-family", "resnet32x4", "ShuffleV1", "icd_kd",
                           "dcd-readme") == 76.01
    assert published_value("cifar100-same-family", "vgg13", "vgg8", "icd",
                           "icd-paper-earlier-version") == 72.98
    assert list(sources())[0] == PAPER and len(sources()) == 4
    with pytest.raises(ValueError, match="unknown source of published values 'crd'"):
        published_tables("crd")


def test_the_published_values_give_the_papers_headline(tmp_path):
    assert published_headline() == {"icd": 20.31, "icd_kd": 70.24}
    by_method = {h.method: h for h in headline(collect_tables(tmp_path))}
    assert round(by_method["icd"].published, 2) == 20.31
    assert round(by_method["icd_kd"].published, 2) == 70.24
    assert by_method["icd"].published_pairs == by_method["icd_kd"].published_pairs == 13
    # WSLD is reported for 8 of the 13 students, FSP (equal widths only) for 6.
    assert (by_method["wsld"].published_pairs, by_method["fsp"].published_pairs) == (8, 6)
    assert all(h.measured is None and h.measured_pairs == 0 for h in by_method.values())
