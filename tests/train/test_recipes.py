"""The paper's recipes and their overrides (train/recipes.py)."""


def test_recipes_follow_the_paper():
    from train.options import RecipeOverrides
    from train.recipes import recipe

    none = RecipeOverrides()
    assert recipe("cifar100", none, "resnet8x4") == (240, 64, 0.05, (150, 180, 210), 5e-4)
    assert recipe("cifar100", none, "MobileNetV2")[2] == 0.01
    assert recipe("imagenet", none, "tv_resnet18") == (100, 256, 0.1, (30, 60, 90), 1e-4)


def test_explicit_recipe_overrides_are_honoured_even_when_zero():
    from train.options import RecipeOverrides
    from train.recipes import recipe

    given = RecipeOverrides(epochs=3, batch_size=16, lr=0.0, lr_decay_epochs=(),
                            weight_decay=0.0)
    plan = recipe("cifar100", given, "resnet8x4")
    assert plan.lr == 0.0 and plan.weight_decay == 0.0 and plan.epochs == 3
    assert plan.batch_size == 16 and plan.lr_decay_epochs == ()


def test_the_help_states_the_recipes_from_the_table(monkeypatch, capsys):
    import pytest

    from train import recipes
    from train.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "CIFAR 240 epochs, batch 64" in " ".join(capsys.readouterr().out.split())
    monkeypatch.setitem(recipes.RECIPES, "cifar", recipes.RECIPES["cifar"]._replace(epochs=123))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "CIFAR 123 epochs" in " ".join(capsys.readouterr().out.split())
