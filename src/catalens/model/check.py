"""Load a model folder's weights and check them against its description, at load time.

A tampered or broken folder fails here with a message naming the file and what is wrong,
never later at predict or serve time (the checks themselves: :mod:`catalens.model.validate`).
"""
from __future__ import annotations

from pathlib import Path

from catalens.model.format import BACKBONE_FILE, HEAD_FILE, HEAD_JSON, ModelDescription, ModelError

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


def check_weights(folder: str | Path, desc: ModelDescription):
    """``(backbone state dict, MultiTaskHead)`` of a single-model folder: the folder is validated
    first (:func:`catalens.model.validate.validate_model_folder`: JSON files and safetensors headers
    against model.json, nothing loaded yet), then the tensors are read."""
    from catalens.heads.estimator import MultiTaskHead
    from catalens.model.validate import read_json, validate_model_folder

    folder = Path(folder)
    validate_model_folder(folder)
    backbone_state = read_safetensors(folder / BACKBONE_FILE)
    head = MultiTaskHead.load(folder, meta=read_json(folder / HEAD_JSON), state=read_safetensors(folder / HEAD_FILE))
    return backbone_state, head
