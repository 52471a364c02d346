"""Load a model folder's weights and check them against its description, at load time.

A tampered or broken folder fails here with a message naming the file and what is wrong,
never later at predict or serve time: a truncated safetensors file, a head.json that does
not describe the weights, a class list in model.json cut short or grown (its head layer has
another number of outputs), a head fed with features of another width than the backbone's.
"""
from __future__ import annotations

import json
from pathlib import Path

from catalens.model.format import BACKBONE_FILE, HEAD_FILE, HEAD_JSON, ModelDescription, ModelError

#: keys head.json may hold (written by MultiTaskHead.save)
HEAD_JSON_KEYS = frozenset({"type", "in_dim", "params", "tasks", "history"})


def read_safetensors(path: Path) -> dict:
    """The tensors of ``path`` (a clear :class:`ModelError` when missing or damaged)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"'{path}' is missing: the model folder is incomplete; train the model again "
                         f"or copy the whole folder")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for truncation / bad headers
        raise ModelError(f"'{path}' cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                         f"damaged (truncated copy?): copy the model folder again") from None


def read_head_json(folder: Path) -> dict:
    path = folder / HEAD_JSON
    if not path.is_file():
        raise ModelError(f"'{path}' is missing: the model folder is incomplete; train the model again")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"'{path}' is not valid JSON ({e}); the model folder is damaged") from None
    if not isinstance(meta, dict):
        raise ModelError(f"'{path}' holds {type(meta).__name__}, not a head description")
    unknown = sorted(set(meta) - HEAD_JSON_KEYS)
    missing = sorted({"in_dim", "params", "tasks"} - set(meta))
    if unknown or missing:
        raise ModelError(f"'{path}': " + "; ".join(
            x for x in (f"unknown keys {unknown}" if unknown else "", f"missing keys {missing}" if missing else "")
            if x) + f"; head.json holds {sorted(HEAD_JSON_KEYS)}: the model folder was edited or damaged")
    return meta


def check_weights(folder: str | Path, desc: ModelDescription):
    """``(backbone state dict, MultiTaskHead)`` of a single-model folder, both checked against ``desc``."""
    from catalens.heads.estimator import MultiTaskHead

    folder = Path(folder)
    backbone_state = read_safetensors(folder / BACKBONE_FILE)
    head_meta = read_head_json(folder)
    head_state = read_safetensors(folder / HEAD_FILE)
    for t in desc.tasks:
        w = head_state.get(f"outputs.{t.name}.weight")
        if w is None:
            raise ModelError(f"'{folder / HEAD_FILE}' has no output layer for task '{t.name}' named in model.json; "
                             f"the model folder is damaged")
        if w.shape[0] != len(t.classes):
            raise ModelError(f"task '{t.name}': model.json lists {len(t.classes)} classes but the head "
                             f"('{folder / HEAD_FILE}') outputs {w.shape[0]}; the class list was edited or cut "
                             f"short: restore model.json or train again")
    mean = head_state.get("mean")
    dim = desc.backbone.get("feature_dim")
    if mean is not None and dim is not None and int(mean.numel()) != int(dim):
        raise ModelError(f"the head takes {int(mean.numel())} features but the backbone in model.json gives {dim}: "
                         f"'{folder}' mixes files of two models")
    try:
        head = MultiTaskHead.load(folder, meta=head_meta, state=head_state)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ModelError(f"'{folder / HEAD_JSON}' does not describe the weights in '{folder / HEAD_FILE}' "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    return backbone_state, head
