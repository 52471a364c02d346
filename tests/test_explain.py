"""Grad-CAM of every kind of model: one backbone, several side by side, ensembles, TTA views.

Tiny random timm CNNs with linear heads: with average pooling and a linear head, each pass's signed
Grad-CAM sums exactly to its share of the logit (less the bias), whatever its resolution and crop, so
where a pass's map is put back in the model's input can be checked to the last digit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from catalens.embed.factory import create_backbone
from catalens.heads import create_head
from catalens.model.ensemble import EnsembleModel
from catalens.model.explain import ExplainError, evidence, grad_cam
from catalens.model.single import CatalensModel
from catalens.model.tta import with_tta
from catalens.tasks import TaskInfo

TASKS = [TaskInfo("kind", "class", ["a", "b", "c"]), TaskInfo("pattern", "tags", ["striped", "checked"])]


def _model(name: str, seed: int, tta=(), hidden: int = 0, crop_pct: float | None = None) -> CatalensModel:
    torch.manual_seed(seed)
    bb = with_tta(create_backbone(name, weights="random", crop_pct=crop_pct), list(tta))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, bb.feature_dim)).astype(np.float32)
    Y = {"kind": rng.integers(0, 3, 60), "pattern": rng.integers(0, 2, (60, 2)).astype(np.float32)}
    head = create_head("linear" if not hidden else "mlp", TASKS, epochs=3, seed=seed,
                       **({"hidden": hidden} if hidden else {})).fit(X[:50], {k: v[:50] for k, v in Y.items()},
                                                                      X[50:], {k: v[50:] for k, v in Y.items()})
    return CatalensModel(bb, head)


def _pixels(model, n: int = 2, seed: int = 0) -> np.ndarray:
    size = model.preprocess.size
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _logit_less_bias(model, pixels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per row, sum over heads of weight x (logit of the class - its logit at zero features)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        feats = model.backbone.module(x)
        members = getattr(model, "members", None)
        heads = [(1.0, tuple(range(1)), model.head._check_fitted())] if members is None else \
            [(w, p, m.head._check_fitted()) for w, p, m in zip(model.weights, model.backbone.member_parts, members)]
        dims = getattr(model.backbone.module, "dims", [feats.shape[1]])
        blocks = torch.split(feats, dims, dim=1) if members is not None else [feats]
        total = np.zeros(len(pixels))
        for w, part, net in heads:
            f = torch.cat([blocks[i] for i in part], 1)
            z = net(f)["kind"] - net(torch.zeros_like(f))["kind"]
            total += w * z[torch.arange(len(pixels)), torch.as_tensor(classes)].double().numpy()
    return total


KINDS = {
    "one backbone": lambda: _model("test_efficientnet", 0),
    "side by side, two sizes": lambda: _model("test_efficientnet+test_efficientnet@128", 1),
    "TTA hflip + zoom": lambda: _model("test_efficientnet", 2, tta=("hflip", "zoom")),
    "TTA over two side by side": lambda: _model("test_efficientnet+test_efficientnet@128", 8, tta=("hflip", "zoom")),
    "ensemble of a single, a side-by-side and two TTA models": lambda: EnsembleModel(
        [_model("test_efficientnet", 0), _model("test_efficientnet+test_efficientnet@128", 1),
         _model("test_efficientnet@128", 3, tta=("zoom",)),
         _model("test_efficientnet+test_efficientnet@128", 8, tta=("hflip",))], weights=[3.0, 1.0, 2.0, 1.0]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_pass_keeps_its_share_of_the_logit_wherever_it_is_put_back(kind):
    model = KINDS[kind]()
    px = _pixels(model)
    signed, chosen = evidence(model, px, "kind", positive=False)
    assert signed.shape == (2, model.preprocess.size, model.preprocess.size)
    np.testing.assert_allclose(signed.sum((1, 2)), _logit_less_bias(model, px, chosen), rtol=1e-4, atol=1e-6)
    # the default class is the model's own answer (an ensemble's: its weighted probabilities)
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        probs = model.predict_proba_features(model.backbone.module(x).numpy())
    assert chosen.tolist() == probs["kind"].argmax(1).tolist()
    heat, again = grad_cam(model, px, "kind", chosen)
    assert again.tolist() == chosen.tolist() and heat.max() == pytest.approx(1.0) and heat.min() >= 0


def test_a_mirrored_view_is_put_back_mirrored():
    """TTA hflip with a linear head: the evidence is the mean of the plain model's on the photo and,
    mirrored back, on its mirror image."""
    tta = _model("test_efficientnet", 2, tta=("hflip",))
    plain = CatalensModel(tta.backbone.plain, tta.head)
    px = _pixels(tta)
    cls = np.array([0, 2])
    got, _ = evidence(tta, px, "kind", cls, positive=False)
    a, _ = evidence(plain, px, "kind", cls, positive=False)
    b, _ = evidence(plain, px[:, :, ::-1].copy(), "kind", cls, positive=False)
    np.testing.assert_allclose(got, (a + b[:, :, ::-1]) / 2, rtol=1e-5, atol=1e-9)


def test_a_zoomed_view_is_put_back_on_the_centre_it_looks_at():
    """TTA zoom with a linear head: the evidence less half the plain model's is the zoomed view's, which lies
    on the centre 7/8 of the input only."""
    tta = _model("test_efficientnet", 2, tta=("zoom",))
    plain = CatalensModel(tta.backbone.plain, tta.head)
    px, cls = _pixels(tta), np.array([1, 0])
    got, _ = evidence(tta, px, "kind", cls, positive=False)
    a, _ = evidence(plain, px, "kind", cls, positive=False)
    zoom = got - a / 2
    S = tta.preprocess.size
    c = int(round(S * 7 / 8))
    o = (S - c) // 2
    outside = np.ones((S, S), bool)
    outside[o:o + c, o:o + c] = False
    assert np.abs(zoom[:, outside]).max() < 1e-9 and np.abs(zoom[:, ~outside]).mean() > 0


def test_a_member_cropped_from_the_shared_input_lights_only_its_crop():
    """An ensemble of a model at crop 1 and one at crop 0.875 decodes each photo once, at crop 1; the
    narrower member sees its centre. With the wide member's weight 0, the evidence lies in that centre only."""
    wide, narrow = _model("test_efficientnet", 5, crop_pct=1.0), _model("test_efficientnet", 6, crop_pct=0.875)
    ens = EnsembleModel([wide, narrow], weights=[0.0, 1.0])
    S = ens.preprocess.size
    c = int(round(S * ens.backbone.module.inputs[1].keep))
    assert ens.backbone.module.inputs[0].keep == 1.0 and c == round(S * 0.875)
    ev, _ = evidence(ens, _pixels(ens), "kind", np.array([1, 1]))
    o = (S - c) // 2
    outside = np.ones((S, S), bool)
    outside[o:o + c, o:o + c] = False
    assert ev[:, outside].max() == 0 and ev[:, ~outside].max() > 0
    signed, _ = evidence(ens, _pixels(ens), "kind", np.array([1, 1]), positive=False)
    np.testing.assert_allclose(signed.sum((1, 2)), _logit_less_bias(ens, _pixels(ens), np.array([1, 1])),
                               rtol=1e-4, atol=1e-6)


def test_an_ensemble_of_one_model_twice_explains_as_the_model():
    m = _model("test_efficientnet", 7, hidden=16)
    px = _pixels(m, 3, seed=1)
    heat, cls = grad_cam(m, px, "kind")
    heat2, cls2 = grad_cam(EnsembleModel([m, m], weights=[1.0, 3.0]), px, "kind")
    assert cls2.tolist() == cls.tolist()
    np.testing.assert_allclose(heat2, heat, atol=1e-6)


def test_refusals_name_the_task_and_the_fix():
    m = _model("test_efficientnet", 0)
    with pytest.raises(ExplainError, match=r"^'pattern' is not a class task of the model; class tasks: \['kind'\]$"):
        grad_cam(m, _pixels(m), "pattern")
    with pytest.raises(ExplainError, match=r"^'colour' is not a class task"):
        grad_cam(EnsembleModel([m, m]), _pixels(m), "colour")
