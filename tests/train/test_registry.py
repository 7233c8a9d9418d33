"""The registries' decorator (train/registry.py)."""
import pytest

from train.registry import registrar


def test_registrar_files_classes_by_name_and_refuses_a_second_entry():
    table = {}
    register = registrar(table, "method")

    @register("a")
    class A:
        pass

    assert table == {"a": A} and A.method == "a"
    with pytest.raises(ValueError, match="'a' is registered twice"):
        register("a")(type("B", (), {}))
