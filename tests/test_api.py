"""The top-level library API: lazy names resolve to the objects the CLI uses."""
import subprocess
import sys

import pytest

import catalens


def test_public_names_resolve_to_the_pipeline_functions():
    from catalens.model.single import CatalensModel
    from catalens.evaluate.pipeline import evaluate_model
    from catalens.train.pipeline import train

    assert catalens.train_model is train
    assert catalens.evaluate_model is evaluate_model
    assert catalens.CatalensModel is CatalensModel
    assert set(catalens.__all__) >= {"train_model", "predict_catalogue", "open_catalogue", "load_config"}


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        catalens.trian  # noqa: B018


def test_import_is_cheap():
    code = "import sys, catalens; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
