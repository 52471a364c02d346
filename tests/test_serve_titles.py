"""Serving a model trained with titles (``catalens train --text``): titles sent with the photos
are fused exactly as in-process prediction fuses them; the own API and KServe v2 take them."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import pandas as pd
import pytest
from test_serve import running_server


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from catalens.config import load_config
    from catalens.export.onnx import export_onnx
    from catalens.synthetic import make_catalogue
    from catalens.train.pipeline import train

    base = tmp_path_factory.mktemp("serve-text")
    data = make_catalogue(base / "data", n_products=90, size=96, seed=5)
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 30},
                              "text": {"enabled": True}, "tracking": False}])
    train(data, base / "model", cfg, log=lambda *a: None)
    export_onnx(base / "model", log=lambda *a: None)
    products = pd.read_csv(base / "data" / "products.csv", dtype=str).head(3)
    photos = [(base / "data" / "images" / f"{i}.jpg").read_bytes() for i in products["id"]]
    return base / "model", photos, products["title"].tolist()


def _expected(model, photos, titles):
    """In-process: ONNX Runtime image probabilities, and those fused with the titles; the classes."""
    from catalens.export.onnx import OnnxModel
    from catalens.text.fusion import TextFusion

    onnx = OnnxModel(model / "model.onnx", threads=1, backend="auto")  # as the server runs it
    image = onnx.predict_bytes(photos)
    classes = {t.name: t.classes for t in onnx.tasks if t.kind == "class"}
    return image, TextFusion.load(model / "text").fuse(image, titles), classes


def _probs(image_json: dict, task: str, classes: list[str]) -> np.ndarray:
    """The full probability vector of one image's class task from a top_k >= n answer."""
    by_label = {c["label"]: c["prob"] for c in image_json["classes"][task]}
    return np.array([by_label[c] for c in classes])


def test_titles_are_fused_over_http_as_in_process(text_model):
    model, photos, titles = text_model
    image, fused, classes = _expected(model, photos, titles)
    task = next(t for t in classes if not np.allclose(fused[t], image[t]))   # titles change this task
    with running_server(model) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        files = [("file", (f"p{i}.jpg", b, "image/jpeg")) for i, b in enumerate(photos)]
        r = c.post("/v1/predict", files=files, data={"title": titles, "top_k": "50"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["titles"] == "fused"
        for i, img in enumerate(body["images"]):
            np.testing.assert_allclose(_probs(img, task, classes[task]), fused[task][i], atol=1e-4)
        # no titles: image only, and the answer says nothing about titles
        plain = c.post("/v1/predict", files=files[:1], data={"top_k": "50"}).json()
        assert "titles" not in plain
        np.testing.assert_allclose(_probs(plain["images"][0], task, classes[task]), image[task][0], atol=1e-4)
        # one raw photo with ?title=
        raw = c.post("/v1/predict", content=photos[0], params={"title": titles[0], "top_k": 50},
                     headers={"Content-Type": "image/jpeg"}).json()
        assert raw["titles"] == "fused"
        np.testing.assert_allclose(_probs(raw["images"][0], task, classes[task]), fused[task][0], atol=1e-4)
        # KServe v2: a second BYTES input named "title"
        doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(photos)],
                           "data": [base64.b64encode(b).decode() for b in photos]},
                          {"name": "title", "datatype": "BYTES", "shape": [len(photos)], "data": titles}]}
        meta = c.get(f"/v2/models/{model.name}").json()
        assert [i["name"] for i in meta["inputs"]] == ["image", "title"] and meta["inputs"][1]["optional"]
        v2 = c.post(f"/v2/models/{model.name}/infer", json=doc).json()
        assert v2["parameters"] == {"titles": "fused"}
        out = next(o for o in v2["outputs"] if o["name"] == task)
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), fused[task], atol=1e-4)
        # a title count that does not match the photos is a 400 naming the fix
        bad = c.post("/v1/predict", files=files, data={"title": titles[:2]})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_titles"
        assert "2 title fields for 3 images: send one title per image" in bad.json()["error"]["message"]
        doc["inputs"][1]["data"] = titles[:1]
        bad = c.post(f"/v2/models/{model.name}/infer", json=doc)
        assert bad.status_code == 400 and "one title per image" in bad.json()["error"]["message"]


def test_titles_sent_to_an_image_only_model_are_reported_as_ignored(tmp_path_factory):
    from test_export import shared_model

    model = shared_model(tmp_path_factory)
    photo = next((model.parent / "data" / "images").glob("*.jpg")).read_bytes()
    with running_server(model) as (url, _):
        r = httpx.post(url + "/v1/predict", files=[("file", ("a.jpg", photo, "image/jpeg"))],
                       data={"title": "Striped cotton shirt"}, timeout=60)
    assert r.status_code == 200 and r.json()["titles"].startswith("ignored: this model has no title model")


def test_titles_note_of_an_ensemble_of_title_models(text_model, tmp_path):
    """The server's ensemble graph is image-only: titles sent to it are ignored, and the note
    says where they are fused instead."""
    from catalens.model.ensemble import build_ensemble
    from catalens.serve.app import ServerState, ServeSettings

    model, _, _ = text_model
    build_ensemble([model, model], tmp_path / "e", log=lambda *a: None)
    state = ServerState(ServeSettings(model_dir=str(tmp_path / "e")))
    assert state.titles_note(None) is None
    assert state.titles_note(["a shirt"]) == ("ignored: the server fuses titles for single models only; "
                                              "'catalens predict' and 'catalens evaluate' fuse them for "
                                              "this ensemble's members")
    single = ServerState(ServeSettings(model_dir=str(model)))
    single.text = object()  # what start-up loads from MODEL/text
    assert single.titles_note(["a shirt"]) == "fused"


def test_long_titles_are_cut_at_the_same_character_count_in_every_protocol():
    """2,000 characters, also for multi-byte text: multipart bytes and JSON strings alike."""
    from catalens.serve.protocols import MAX_TITLE_CHARS, check_titles, parse_multipart

    title = "é" * 2500 + "z"                                     # 2 bytes a character in UTF-8
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff\xd8photo" + \
        (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n{title}"
         f"\r\n--{boundary}--\r\n").encode()
    uploads, fields = parse_multipart(body, f"multipart/form-data; boundary={boundary}", 8)
    assert len(uploads) == 1
    assert fields["titles"] == ["é" * MAX_TITLE_CHARS]
    assert check_titles([title], 1) == ["é" * MAX_TITLE_CHARS]    # KServe v2 / JSON / query strings
    assert check_titles(fields["titles"], 1) == ["é" * MAX_TITLE_CHARS]


def test_decisions_and_conflicts_are_the_same_in_every_protocol(text_model):
    """accept / unknown / conflict: the catalens API, TF-Serving and KServe v2 return the values
    the in-process decoder gives for the same photos and titles (one title per photo; the second
    photo gets the title of a product of another category)."""
    from catalens.export.onnx import OnnxModel
    from catalens.model.decode import Decoder

    model, photos, titles = text_model
    products = pd.read_csv(model.parent / "data" / "products.csv", dtype=str)
    first = products.iloc[1]
    other = products[products["category"] != first["category"]]["title"].dropna().iloc[0]
    sent = [titles[0], other, None]
    image = OnnxModel(model / "model.onnx", threads=1, backend="auto").predict_bytes(photos)
    dec = Decoder.from_folder(model)
    want = dec.columns(dec(image, sent, top_k=1))
    assert dec.accept and dec.unknown and dec.text is not None
    assert want["conflict"][2] is False and want["conflict_winner"][2] is None      # no title: no conflict
    assert want["conflict"][0] is False                                              # its own title
    tasks = [t.name for t in dec.tasks if t.kind == "class"]
    with running_server(model) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        files = [("file", (f"p{i}.jpg", b, "image/jpeg")) for i, b in enumerate(photos)]
        api = c.post("/v1/predict", files=files, data={"title": [t or "" for t in sent]}).json()["images"]
        tf = c.post(f"/v1/models/{model.name}:predict", json={"instances": [
            {"b64": base64.b64encode(b).decode(), "title": t} for b, t in zip(photos, sent)]}).json()["predictions"]
        doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                           "data": [base64.b64encode(b).decode() for b in photos]},
                          {"name": "title", "datatype": "BYTES", "shape": [3], "data": [t or "" for t in sent]}]}
        v2 = {o["name"]: o for o in c.post(f"/v2/models/{model.name}/infer", json=doc).json()["outputs"]}
        meta = {o["name"]: o["datatype"] for o in c.get(f"/v2/models/{model.name}").json()["outputs"]}
    for i in range(3):
        assert api[i]["conflict"] == want["conflict"][i] == tf[i]["conflict"] == v2["conflict"]["data"][i]
        assert api[i]["conflict_winner"] == want["conflict_winner"][i]
        assert tf[i]["conflict_winner"] == v2["conflict_winner"]["data"][i] == (want["conflict_winner"][i] or "")
        assert api[i]["unknown"] == want["unknown"][i] == tf[i]["unknown"] == v2["unknown"]["data"][i]
        assert api[i]["unknown_score"] == pytest.approx(want["unknown_score"][i], abs=1e-5)
        assert tf[i]["unknown_score"] == pytest.approx(want["unknown_score"][i], abs=1e-5)
        assert v2["unknown_score"]["data"][i] == pytest.approx(want["unknown_score"][i], abs=1e-5)
        for t in tasks:
            assert api[i]["labels"][t]["accept"] == want[f"{t}_accept"][i] == tf[i][f"{t}_accept"] \
                == v2[f"{t}_accept"]["data"][i]
            assert api[i]["labels"][t]["conflict"] == want[f"{t}_conflict"][i] == tf[i][f"{t}_conflict"] \
                == v2[f"{t}_conflict"]["data"][i]
    assert meta["unknown"] == "BOOL" and meta["unknown_score"] == "FP32" and meta["conflict_winner"] == "BYTES"
    assert [meta[f"{t}_accept"] for t in tasks] == ["BOOL"] * len(tasks)
    assert v2["conflict"]["shape"] == [3] and v2["conflict"]["datatype"] == "BOOL"
