"""Checks of a model folder before anything is built from it: a tampered or broken folder fails
at load with one clear error naming the file and the field, never later (an out-of-memory kill, a
server that reports ready and answers 500, a raw traceback).

What is checked (reading only JSON and the safetensors headers, never the tensors):

- ``model.json``: valid JSON; format; backbone description with preprocessing sizes within
  bounds (``MAX_IMAGE_SIDE``), a known interpolation, 3 finite means and positive stds; tasks
  with unique names, a known kind, a non-empty list of unique class names, tag thresholds
  in [0, 1] (one per tag), parents that are class tasks and form no cycle; known TTA views.
- ``head.json``: only the keys this version writes; ``params`` the head accepts; the same tasks
  (names, kinds, number of classes) as ``model.json``; ``in_dim`` equal to the backbone's
  ``feature_dim``.
- ``head.safetensors`` (or the state dict given): exactly the tensors the head has, each of the
  shape the task list implies (a class list cut short shows here).
- ``history.json`` when present: the typed training history (format, stage, increasing epochs).
- ``text/title_model.safetensors`` when present: per task ``W (classes, features)`` and
  ``b (classes,)`` as wide as the task's class list.
- every ``*.safetensors`` in the folder (backbone, head, title model): a readable header and a
  file as long as the header says (a truncated copy shows here).

Use :func:`validate_model_folder` from a loader; each failure raises :class:`ModelFolderError`
(a ``ValueError``, so the CLI prints it as one line).
"""
from __future__ import annotations

import inspect
import json
import math
import struct
from pathlib import Path

from catalens.model.format import ModelError
from catalens.tasks import TaskInfo, hierarchy_levels
from catalens.ingest.images import CROP_MODES, JPEG_DECODERS, check_box

#: largest resize / crop side accepted from a model folder (config allows up to 1024)
MAX_IMAGE_SIDE = 4096
MIN_IMAGE_SIDE = 8
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
HEAD_JSON_KEYS = frozenset({"type", "in_dim", "params", "tasks", "history"})
TASK_KEYS = frozenset({"name", "kind", "classes", "parent", "thresholds", "extra"})
#: the safetensors header is JSON; larger claims are not a real header
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FIX = "re-copy the model folder from where it was trained, or train it again"


class ModelFolderError(ModelError):
    """A model folder that cannot be used; the message names the file, the field and the fix."""


def validate_model_folder(folder: str | Path, description: dict | None = None,
                          head_state: dict | None = None) -> None:
    """Check a model folder written by ``catalens train``; raise :class:`ModelFolderError` if not usable.

    ``description`` is the parsed ``model.json`` when the caller has it (else it is read);
    ``head_state`` the loaded head tensors (name → tensor/array with ``.shape``) when the caller
    has them (else shapes come from the ``head.safetensors`` header). Ensemble folders are left
    to their members' loads.
    """
    folder = Path(folder)
    meta = description if description is not None else read_json(folder / "model.json")
    if meta.get("ensemble"):
        return
    for f in sorted(folder.rglob("*.safetensors")):
        safetensors_shapes(f)  # readable header, file as long as it says
    check_description(meta, folder / "model.json")
    head_path = folder / "head.json"
    head_meta = read_json(head_path)
    tasks = [TaskInfo.from_dict(t) for t in meta["tasks"]]
    check_head_json(head_meta, tasks, meta["backbone"], head_path)
    shapes = ({k: tuple(v.shape) for k, v in head_state.items()} if head_state is not None
              else safetensors_shapes(folder / "head.safetensors"))
    check_head_shapes(shapes, tasks, int(head_meta["in_dim"]), int(head_meta["params"].get("hidden", 0)),
                      folder / "head.safetensors")
    title = folder / "text" / "title_model.safetensors"
    if title.exists():
        check_title_shapes(safetensors_shapes(title), tasks, title)
    check_history(folder)


def check_history(folder: Path) -> None:
    """``history.json`` when present: the typed per-epoch history (a folder without it is fine)."""
    from catalens.model.format import read_history

    try:
        read_history(folder)
    except ModelError as e:
        raise ModelFolderError(str(e)) from None


# ----------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a clean error naming it."""
    if not path.is_file():
        raise ModelFolderError(f"'{path}' is missing: the model folder is incomplete; {FIX}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFolderError(f"'{path}' is not valid JSON ({e}); {FIX}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"'{path}' holds a JSON {type(data).__name__}, not an object; {FIX}")
    return data


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors header, after checking the file is complete.

    Reads the header only (8-byte length + JSON), then compares the data length it describes
    with the file size: a truncated or padded file fails here, naming the file.
    """
    if not path.is_file():
        raise ModelFolderError(f"'{path}' is missing; {FIX}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFolderError(f"'{path}' is truncated: {size} bytes, not even a safetensors header; {FIX}")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelFolderError(f"'{path}' is truncated or not a safetensors file: its header claims "
                                   f"{n} bytes, the file holds {size}; {FIX}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise ModelFolderError(f"'{path}' has an unreadable safetensors header; {FIX}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"'{path}' has an unreadable safetensors header; {FIX}")
    shapes, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"'{path}': tensor '{name}' has a malformed header entry; {FIX}") from None
        if stop - start != width * math.prod(shape) or start < 0:
            raise ModelFolderError(f"'{path}': tensor '{name}' {list(shape)} does not match its byte range; {FIX}")
        shapes[name] = shape
        end = max(end, stop)
    if size != 8 + n + end:
        what = "truncated" if size < 8 + n + end else "longer than its header says"
        raise ModelFolderError(f"'{path}' is {what}: the header describes {8 + n + end} bytes, the file holds "
                               f"{size}; {FIX}")
    return shapes


# ----------------------------------------------------------------------------- model.json


def check_description(meta: dict, where: Path | str = "model.json") -> None:
    """``model.json``: backbone preprocessing within bounds, well-formed tasks, TTA views."""
    if not isinstance(meta.get("backbone"), dict):
        raise ModelFolderError(f"'{where}': 'backbone' is missing or not an object; {FIX}")
    check_backbone(meta["backbone"], where)
    tasks = meta.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ModelFolderError(f"'{where}': 'tasks' must be a non-empty list; {FIX}")
    infos = [check_task(t, i, where) for i, t in enumerate(tasks)]
    names = [t.name for t in infos]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ModelFolderError(f"'{where}': task name(s) {dup} appear more than once; {FIX}")
    try:
        hierarchy_levels(infos)
    except ValueError as e:
        raise ModelFolderError(f"'{where}': {e}") from None
    tta = meta.get("tta") or []
    from catalens.model.tta import VIEWS

    if not isinstance(tta, list) or any(v not in VIEWS for v in tta):
        raise ModelFolderError(f"'{where}': tta {tta!r} names unknown views; valid views: {', '.join(VIEWS)}")


def check_backbone(desc: dict, where: Path | str) -> None:
    """Preprocessing of a backbone description (and of each member of a composite one)."""
    for m in desc.get("members") or []:
        check_backbone(m, where)
    if desc.get("arch") == "concat":
        return
    if not isinstance(desc.get("feature_dim"), int) or desc["feature_dim"] < 1:
        raise ModelFolderError(f"'{where}': backbone.feature_dim must be a positive integer; "
                               f"got {desc.get('feature_dim')!r}; {FIX}")
    pre = desc.get("preprocess")
    if not isinstance(pre, dict):
        raise ModelFolderError(f"'{where}': backbone.preprocess is missing; {FIX}")
    for key in ("size", "resize"):
        v = pre.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE:
            raise ModelFolderError(f"'{where}': backbone.preprocess.{key} is {v!r}; expected an integer from "
                                   f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels; {FIX}")
    width = pre.get("width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool)
                              or not MIN_IMAGE_SIDE <= width <= MAX_IMAGE_SIDE):
        raise ModelFolderError(f"'{where}': backbone.preprocess.width is {width!r}; expected an integer from "
                               f"{MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels (the input's columns), or no "
                               f"width for a square input; {FIX}")
    if pre["resize"] < pre["size"]:
        raise ModelFolderError(f"'{where}': backbone.preprocess.resize {pre['resize']} is smaller than the crop "
                               f"size {pre['size']}; {FIX}")
    if pre.get("crop", "center") not in CROP_MODES:
        raise ModelFolderError(f"'{where}': backbone.preprocess.crop is {pre.get('crop')!r}; expected one of "
                               f"{', '.join(CROP_MODES)}; {FIX}")
    if pre.get("crop") == "box" or "box" in pre:
        try:
            check_box(pre.get("box"))
        except ValueError as e:
            raise ModelFolderError(f"'{where}': backbone.preprocess.box: {e}; {FIX}") from None
    if pre.get("jpeg", "pillow") not in JPEG_DECODERS:
        raise ModelFolderError(f"'{where}': backbone.preprocess.jpeg is {pre.get('jpeg')!r}; expected one of "
                               f"{', '.join(JPEG_DECODERS)} (the JPEG decoder of the training features); {FIX}")
    if pre.get("interpolation") not in INTERPOLATIONS:
        raise ModelFolderError(f"'{where}': backbone.preprocess.interpolation is {pre.get('interpolation')!r}; "
                               f"expected one of {', '.join(INTERPOLATIONS)}")
    for key, positive in (("mean", False), ("std", True)):
        v = pre.get(key)
        ok = (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and math.isfinite(x)
                                                          and (x > 0 or not positive) for x in v))
        if not ok:
            raise ModelFolderError(f"'{where}': backbone.preprocess.{key} is {v!r}; expected 3 finite numbers"
                                   f"{' > 0' if positive else ''}; {FIX}")


def check_task(t, i: int, where: Path | str) -> TaskInfo:
    """One entry of ``tasks``: known keys, kind, unique non-empty class names, tag thresholds."""
    if not isinstance(t, dict):
        raise ModelFolderError(f"'{where}': tasks[{i}] is not an object; {FIX}")
    extra = sorted(set(t) - TASK_KEYS)
    if extra:
        raise ModelFolderError(f"'{where}': tasks[{i}] has unknown key(s) {extra}; valid keys: "
                               f"{', '.join(sorted(TASK_KEYS))}; {FIX}")
    name = t.get("name")
    if not isinstance(name, str) or not name:
        raise ModelFolderError(f"'{where}': tasks[{i}].name must be a non-empty string; {FIX}")
    if t.get("kind") not in ("class", "tags"):
        raise ModelFolderError(f"'{where}': task '{name}' has kind {t.get('kind')!r}; expected 'class' or 'tags'")
    classes = t.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelFolderError(f"'{where}': task '{name}' classes must be a non-empty list of names; {FIX}")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise ModelFolderError(f"'{where}': task '{name}' lists class(es) {dup[:5]} more than once; {FIX}")
    th = t.get("thresholds")
    if th is not None:
        if t["kind"] != "tags":
            raise ModelFolderError(f"'{where}': task '{name}' is a class task; thresholds apply to tags only")
        if (not isinstance(th, list) or len(th) != len(classes)
                or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in th)):
            raise ModelFolderError(f"'{where}': task '{name}' needs one threshold in [0, 1] per tag "
                                   f"({len(classes)}); got {th!r}; {FIX}")
    parent = t.get("parent")
    if parent is not None and not isinstance(parent, str):
        raise ModelFolderError(f"'{where}': task '{name}' parent must be a task name; got {parent!r}")
    return TaskInfo.from_dict({k: t[k] for k in t if k in TASK_KEYS} | {"extra": t.get("extra") or {}})


# ----------------------------------------------------------------------------- head


def _head_params() -> set[str]:
    from catalens.heads.estimator import MultiTaskHead

    return set(inspect.signature(MultiTaskHead.__init__).parameters) - {"self", "tasks"}


def check_head_json(head: dict, tasks: list[TaskInfo], backbone: dict, where: Path | str) -> None:
    """``head.json`` against this version's keys and against ``model.json``'s tasks and backbone."""
    extra = sorted(set(head) - HEAD_JSON_KEYS)
    if extra:
        raise ModelFolderError(f"'{where}' has unknown key(s) {extra}; this catalens writes "
                               f"{', '.join(sorted(HEAD_JSON_KEYS))}; {FIX}")
    missing = sorted({"in_dim", "params", "tasks"} - set(head))
    if missing:
        raise ModelFolderError(f"'{where}' lacks key(s) {missing}; {FIX}")
    params = head["params"]
    if not isinstance(params, dict):
        raise ModelFolderError(f"'{where}': 'params' must be an object; {FIX}")
    unknown = sorted(set(params) - _head_params())
    if unknown:
        raise ModelFolderError(f"'{where}': params has unknown key(s) {unknown}; valid keys: "
                               f"{', '.join(sorted(_head_params()))}; {FIX}")
    hidden = params.get("hidden", 0)
    if not isinstance(hidden, int) or not 0 <= hidden <= 1 << 16:
        raise ModelFolderError(f"'{where}': params.hidden is {hidden!r}; expected an integer from 0 to 65536")
    in_dim, feature_dim = head.get("in_dim"), backbone.get("feature_dim")
    if backbone.get("arch") == "concat":
        feature_dim = sum(m.get("feature_dim", 0) for m in backbone.get("members") or [])
    if in_dim != feature_dim:
        raise ModelFolderError(f"'{where}': in_dim {in_dim!r} differs from the backbone's feature_dim "
                               f"{feature_dim!r} in model.json: the head belongs to another backbone; {FIX}")
    if not isinstance(head["tasks"], list):
        raise ModelFolderError(f"'{where}': 'tasks' must be a list; {FIX}")
    theirs = [(t.get("name"), t.get("kind"), len(t.get("classes") or [])) for t in head["tasks"]
              if isinstance(t, dict)]
    ours = [(t.name, t.kind, t.n_outputs) for t in tasks]
    if theirs != ours:
        raise ModelFolderError(f"'{where}' and model.json disagree on the tasks (name, kind, classes): "
                               f"{theirs} vs {ours}; {FIX}")


def expected_head_shapes(tasks: list[TaskInfo], in_dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The shapes of every output tensor of the head (trunk tensors are checked separately)."""
    width = hidden or in_dim
    out = {"mean": (in_dim,), "std": (in_dim,), "temperature": (len(tasks),)}
    for t in tasks:
        out[f"outputs.{t.name}.weight"] = (t.n_outputs, width)
        out[f"outputs.{t.name}.bias"] = (t.n_outputs,)
    return out


def check_head_shapes(shapes: dict[str, tuple], tasks: list[TaskInfo], in_dim: int, hidden: int,
                      where: Path | str) -> None:
    """Head tensors: each output layer as wide as its task's class list, nothing missing or extra."""
    want = expected_head_shapes(tasks, in_dim, hidden)
    for key, shape in want.items():
        if key not in shapes:
            raise ModelFolderError(f"'{where}' has no tensor '{key}'; {FIX}")
        if tuple(shapes[key]) != shape:
            task = key.split(".")[1] if key.startswith("outputs.") else None
            why = (f"task '{task}' lists {shape[0]} classes in model.json but the weights have "
                   f"{shapes[key][0]} outputs: the class list was edited or the weights belong to another model"
                   if task and shapes[key][1:] == shape[1:] else "the weights belong to another model")
            raise ModelFolderError(f"'{where}': tensor '{key}' is {list(shapes[key])}, expected {list(shape)}: "
                                   f"{why}; {FIX}")
    trunk = {k: v for k, v in shapes.items() if k.startswith("trunk.")}
    extra = sorted(set(shapes) - set(want) - set(trunk))
    if extra:
        raise ModelFolderError(f"'{where}' has tensor(s) {extra[:5]} no task of model.json uses; {FIX}")
    weights = [v for k, v in trunk.items() if k.endswith(".weight")]
    if hidden and weights != [(hidden, in_dim)]:
        raise ModelFolderError(f"'{where}': the hidden layer is {[list(w) for w in weights]}, expected "
                               f"[{hidden}, {in_dim}]; {FIX}")
    if not hidden and trunk:
        raise ModelFolderError(f"'{where}' has hidden-layer tensors but head.json says hidden 0; {FIX}")


def check_title_shapes(shapes: dict[str, tuple], tasks: list[TaskInfo], where: Path | str) -> None:
    """Title model: one ``W (classes, features)`` and ``b (classes,)`` per task, sharing ``features``."""
    widths = set()
    for t in tasks:
        w, b = shapes.get(f"{t.name}.W"), shapes.get(f"{t.name}.b")
        if w is None or b is None:
            raise ModelFolderError(f"'{where}' has no weights for task '{t.name}'; {FIX}")
        if len(w) != 2 or w[0] != t.n_outputs or tuple(b) != (t.n_outputs,):
            raise ModelFolderError(f"'{where}': task '{t.name}' lists {t.n_outputs} classes in model.json but the "
                                   f"title model's weights are {list(w)} and {list(b)}; {FIX}")
        widths.add(w[1])
    if len(widths) > 1:
        raise ModelFolderError(f"'{where}': the tasks' weights disagree on the number of title features "
                               f"{sorted(widths)}; {FIX}")
