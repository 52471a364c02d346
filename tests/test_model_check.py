"""A tampered or broken model folder is refused by catalens.model.validate with the file, the field
and the fix (issue 13, item 9): a real small model is trained once, copied, and damaged."""
from __future__ import annotations

import json
import shutil

import pytest

from catalens.cli import main
from catalens.model.validate import FIX, MAX_IMAGE_SIDE, ModelFolderError, validate_model_folder
from catalens.synthetic import make_catalogue


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("check-model")
    data = make_catalogue(root / "data", n_products=24, size=96, seed=6)
    assert main(["train", str(data), "--out", str(root / "model"), "--no-progress", "--runtime", "eager",
                 "--set", "head.epochs=10", "--text"]) == 0
    assert (root / "model" / "text" / "title_model.safetensors").exists()
    return root / "model"


@pytest.fixture
def model(trained, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(trained, dst)
    return dst


def _edit(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _refused(model, message: str):
    with pytest.raises(ModelFolderError) as e:
        validate_model_folder(model)
    assert str(e.value) == message
    return e


def test_a_trained_folder_passes_and_with_its_loaded_head(model):
    from safetensors.torch import load_file

    validate_model_folder(model)
    validate_model_folder(model, json.loads((model / "model.json").read_text()),
                          load_file(str(model / "head.safetensors")))


@pytest.mark.parametrize("key, value, expected", [
    ("size", 60000, f"expected an integer from 8 to {MAX_IMAGE_SIDE} pixels"),
    ("resize", 60000, f"expected an integer from 8 to {MAX_IMAGE_SIDE} pixels"),
    ("size", "224", f"expected an integer from 8 to {MAX_IMAGE_SIDE} pixels"),
])
def test_preprocess_sizes_are_bounded(model, key, value, expected):
    _edit(model / "model.json", lambda d: d["backbone"]["preprocess"].__setitem__(key, value))
    _refused(model, f"'{model / 'model.json'}': backbone.preprocess.{key} is {value!r}; {expected}; {FIX}")


def test_std_of_zero_is_refused(model):
    _edit(model / "model.json", lambda d: d["backbone"]["preprocess"].__setitem__("std", [0.5, 0, 0.5]))
    _refused(model, f"'{model / 'model.json'}': backbone.preprocess.std is [0.5, 0, 0.5]; expected 3 finite "
                    f"numbers > 0; {FIX}")


def test_class_list_cut_short_is_refused_against_the_weights(model):
    def cut(d):
        for t in d["tasks"]:
            if t["name"] == "category":
                t["classes"] = t["classes"][:-1]
    _edit(model / "model.json", cut)
    _edit(model / "head.json", cut)  # both edited: only the weights can tell
    _refused(model, f"'{model / 'head.safetensors'}': tensor 'outputs.category.weight' is [9, 1280], expected "
                    f"[8, 1280]: task 'category' lists 8 classes in model.json but the weights have 9 outputs: "
                    f"the class list was edited or the weights belong to another model; {FIX}")


def test_class_list_cut_in_model_json_only_disagrees_with_head_json(model):
    _edit(model / "model.json", lambda d: d["tasks"][1].__setitem__("classes", d["tasks"][1]["classes"][:3]))
    with pytest.raises(ModelFolderError, match=r"head.json' and model.json disagree on the tasks \(name, kind, "
                                               r"classes\): \[\('department', 'class', 4\), \('category', "
                                               r"'class', 9\)"):
        validate_model_folder(model)


@pytest.mark.parametrize("name", ["head.safetensors", "backbone.safetensors"])
def test_truncated_safetensors_name_the_file(model, name):
    f = model / name
    full = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFolderError) as e:
        validate_model_folder(model)
    head_len = int.from_bytes(f.read_bytes()[:8], "little")
    assert str(e.value) == (f"'{f}' is truncated: the header describes {full} bytes, the file holds {full - 100}; "
                            f"{FIX}")
    assert head_len > 0


def test_garbage_instead_of_safetensors(model):
    (model / "head.safetensors").write_bytes(b"\xff" * 64)
    claimed = 2 ** 64 - 1
    _refused(model, f"'{model / 'head.safetensors'}' is truncated or not a safetensors file: its header claims "
                    f"{claimed} bytes, the file holds 64; {FIX}")


def test_extra_head_json_keys_are_refused(model):
    _edit(model / "head.json", lambda d: d.__setitem__("backdoor", 1))
    _refused(model, f"'{model / 'head.json'}' has unknown key(s) ['backdoor']; this catalens writes "
                    f"history, in_dim, params, tasks, type; {FIX}")
    _edit(model / "head.json", lambda d: (d.pop("backdoor"), d["params"].__setitem__("layers", 3)))
    with pytest.raises(ModelFolderError, match=r"head.json': params has unknown key\(s\) \['layers'\]; valid keys: "):
        validate_model_folder(model)


def test_head_for_another_backbone_is_refused(model):
    _edit(model / "head.json", lambda d: d.__setitem__("in_dim", 1024))
    _refused(model, f"'{model / 'head.json'}': in_dim 1024 differs from the backbone's feature_dim 1280 in "
                    f"model.json: the head belongs to another backbone; {FIX}")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tasks"][2].__setitem__("thresholds", [0.5]),
     "task 'pattern' needs one threshold in [0, 1] per tag (4); got [0.5]; " + FIX),
    (lambda d: d["tasks"][0].__setitem__("parent", "category"),
     "task parents form a cycle: department > category > department; a hierarchy runs from one root task "
     "down, so remove one 'parent'"),
    (lambda d: d["tasks"][1].__setitem__("classes", ["a", "a"]),
     "task 'category' lists class(es) ['a'] more than once; " + FIX),
    (lambda d: d["tasks"][0].__setitem__("kind", "regression"),
     "task 'department' has kind 'regression'; expected 'class' or 'tags'"),
    (lambda d: d.__setitem__("tta", ["rotate"]), "tta ['rotate'] names unknown views; valid views: hflip, zoom"),
])
def test_malformed_tasks_in_model_json(model, change, message):
    _edit(model / "model.json", change)
    _refused(model, f"'{model / 'model.json'}': {message}")


def test_invalid_json_names_the_file(model):
    (model / "head.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"head.json' is not valid JSON \(Expecting property name"):
        validate_model_folder(model)


def test_title_model_weights_must_fit_the_class_list(model):
    from safetensors.numpy import load_file, save_file

    f = model / "text" / "title_model.safetensors"
    w = load_file(str(f))
    w["category.W"], w["category.b"] = w["category.W"][:-1], w["category.b"][:-1]
    save_file(w, str(f))
    n_features = w["category.W"].shape[1]
    _refused(model, f"'{f}': task 'category' lists 9 classes in model.json but the title model's weights are "
                    f"[8, {n_features}] and [8]; {FIX}")
