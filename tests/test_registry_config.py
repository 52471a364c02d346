import pytest

from catalens.config import Config, load_config, parse_override
from catalens.registry import Registry, UnknownNameError


def test_unknown_name_lists_close_matches():
    r = Registry("backbone")
    for n in ("efficientnet_lite0", "efficientnet_lite1", "resnet50"):
        r.register(n)(lambda: n)
    with pytest.raises(UnknownNameError) as e:
        r.get("efficientnet_lite3")
    msg = str(e.value)
    assert "unknown backbone 'efficientnet_lite3'" in msg
    assert "Did you mean: efficientnet_lite0" in msg or "efficientnet_lite1" in msg.split("Known")[0]


def test_registering_twice_fails():
    r = Registry("head")
    r.register("a")(object)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(object)


def test_precedence_defaults_file_cli(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("seed: 7\nhead:\n  lr: 0.05\n  epochs: 10\n")
    cfg = load_config(f, [parse_override("head.lr=0.001")])
    assert cfg.seed == 7                 # file over default
    assert cfg.head.epochs == 10         # file over default
    assert cfg.head.lr == 0.001          # CLI over file
    assert cfg.head.batch_size == Config().head.batch_size  # default kept


def test_unknown_key_rejected_with_valid_keys(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("head:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError) as e:
        load_config(f)
    assert "head.learning_rate: unknown key" in str(e.value)
    assert "lr" in str(e.value)


def test_bad_value_names_key():
    with pytest.raises(ValueError, match="head.epochs"):
        load_config(None, [parse_override("head.epochs=-3")])


def test_override_needs_equals():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("head.lr")


def test_config_yaml_round_trip(tmp_path):
    cfg = load_config(None, [parse_override("head.loss_weights={a: 2.0}")])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_one_fold_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"kfold.folds.*1 fold is no cross-validation.*--folds 5"):
        load_config(None, [{"kfold": {"folds": 1}}])
    assert load_config(None, [{"kfold": {"folds": 5}}]).kfold.folds == 5


@pytest.mark.parametrize("name", ["run.yaml", "three-backbones.yaml"])
def test_example_run_configurations_load_and_build(name):
    """The run configurations in examples/ are valid, and their backbone builds."""
    from pathlib import Path

    from catalens.embed.factory import create_backbone

    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / name)
    bb = create_backbone(cfg.backbone.name, "random", cfg.backbone.image_size, cfg.backbone.crop_pct)
    assert bb.feature_dim > 0 and bb.preprocess.size >= 224
    if "+" in cfg.backbone.name:
        assert [m.preprocess.size for m in bb.members] == [256, 272, 300]
        assert bb.preprocess.size == bb.preprocess.resize == 300        # crop 1: the whole short side
