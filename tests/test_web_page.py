"""The web page at ``/``, end to end in headless Chromium: upload a real photo, see the bars."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_export import real_photos, shared_model
from test_serve import running_server
from test_serve_titles import text_model  # noqa: F401  (fixture)

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None) \
    or shutil.which("chromium")
CHROMEDRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_a_photo_and_see_bars_and_tags(tmp_path_factory, tmp_path, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from catalens.export.onnx import OnnxModel

    model = shared_model(tmp_path_factory)
    try:
        photo = real_photos(1)[0]
    except pytest.skip.Exception:
        photo = sorted((model.parent / "data" / "images").glob("*.jpg"))[0]
    onnx = OnnxModel(model / "model.onnx", threads=1, backend="auto")  # as the server runs it
    probs = onnx.predict_bytes([photo.read_bytes()])
    tasks = {t.name: t for t in onnx.tasks}
    top_dep = tasks["department"].classes[int(probs["department"][0].argmax())]
    top_cat = tasks["category"].classes[int(probs["category"][0].argmax())]

    with running_server(model, log=tmp_path / "server.log") as (url, _):
        browser.get(url + "/")
        assert "catalens" in browser.title
        assert "model: model" in browser.find_element(By.ID, "model").text
        assert not browser.find_element(By.ID, "staged").is_displayed()   # image-only model: no title boxes
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait = WebDriverWait(browser, 90)
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card .bar")))
        card = browser.find_element(By.CSS_SELECTOR, ".card")
        levels = card.find_elements(By.CSS_SELECTOR, ".level[data-task]")
        assert [lv.get_attribute("data-task") for lv in levels] == ["department", "category"]  # root level first
        dep_top = levels[0].find_element(By.CSS_SELECTOR, ".bar.top .label").text
        cat_top = levels[1].find_element(By.CSS_SELECTOR, ".bar.top .label").text
        assert (dep_top, cat_top) == (top_dep, top_cat)
        assert top_cat in card.find_element(By.CSS_SELECTOR, ".path").text
        top_p = float(probs["department"][0].max()) * 100
        assert levels[0].find_element(By.CSS_SELECTOR, ".bar.top .pct").text == f"{top_p:.1f}%"
        style = levels[0].find_element(By.CSS_SELECTOR, ".bar.top .fill").get_attribute("style")
        assert abs(float(style.split("width:")[1].split("%")[0]) - top_p) < 0.1
        chips = card.find_elements(By.CSS_SELECTOR, ".tag")
        assert sorted(c.text.split()[0] for c in chips) == sorted(tasks["pattern"].classes)
        on = {c.text.split()[0] for c in card.find_elements(By.CSS_SELECTOR, ".tag.on")}
        thr = tasks["pattern"].threshold_array()
        assert on == {t for t, p, h in zip(tasks["pattern"].classes, probs["pattern"][0], thr) if p >= h}
        assert "photo" in browser.find_element(By.ID, "status").text
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))

        # a non-image through the same input shows the server's error, and the page keeps working
        bad = tmp_path / "notes.jpg"
        bad.write_bytes(b"this is not a photo")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(lambda d: "not_an_image" in d.find_element(By.ID, "status").text)
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img.std() > 10  # not a blank page
    non_white = (img.min(axis=2) < 200).mean()
    assert non_white > 0.01
    accent = ((img[..., 2] > 150) & (img[..., 0] < 90)).mean()  # the blue bars are drawn
    assert accent > 0.001


def test_a_title_model_takes_one_title_per_photo_and_shows_the_conflict(text_model, tmp_path, browser):
    """A --text model: each chosen photo gets its own title box; the bars show each photo fused with
    its own title, and a photo sent with another category's title shows the conflict flag when the
    decoder flags one (the same answer as in-process)."""
    import pandas as pd
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from catalens.export.onnx import OnnxModel
    from catalens.model.decode import Decoder

    model, photos, titles = text_model
    products = pd.read_csv(model.parent / "data" / "products.csv", dtype=str)
    other = products[products["category"] != products.iloc[1]["category"]]["title"].dropna().iloc[0]
    sent = [titles[0], other]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"p{i}.jpg")
        paths[-1].write_bytes(photos[i])
    image = OnnxModel(model / "model.onnx", threads=1, backend="auto").predict_bytes(photos[:2])
    dec = Decoder.from_folder(model)
    ans = dec(image, sent, top_k=5)
    want = [dec.record(ans, i) for i in range(2)]
    with running_server(model, log=tmp_path / "server.log") as (url, _):
        browser.get(url + "/")
        assert not browser.find_element(By.ID, "staged").is_displayed()
        browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in paths))
        wait = WebDriverWait(browser, 60)
        boxes = browser.find_elements(By.CSS_SELECTOR, "#staged-list .photo-title")
        assert len(boxes) == 2 and browser.find_element(By.ID, "staged").is_displayed()
        for box, title in zip(boxes, sent):
            box.send_keys(title)
        browser.find_element(By.ID, "predict").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card .bar")))
        assert "with their titles" in browser.find_element(By.ID, "status").text
        cards = {c.get_attribute("data-file"): c for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
        for i, rec in enumerate(want):
            card = cards[f"p{i}.jpg"]
            assert card.find_element(By.CSS_SELECTOR, ".sent-title").text == "title: " + sent[i]
            for task, lab in rec["labels"].items():
                level = card.find_element(By.CSS_SELECTOR, f'.level[data-task="{task}"]')
                assert level.find_element(By.CSS_SELECTOR, ".bar.top .label").text == lab["label"]
                assert level.find_element(By.CSS_SELECTOR, ".bar.top .pct").text == f"{lab['prob'] * 100:.1f}%"
            flags = card.find_elements(By.CSS_SELECTOR, ".conflict")
            if rec["conflict"]:
                assert flags[0].get_attribute("data-winner") == rec["conflict_winner"]
                assert f"the answer follows the {rec['conflict_winner']}" in flags[0].text
            else:
                assert flags == []
    assert want[0]["conflict"] is False and want[1]["conflict"] is True


def test_hostile_class_names_do_not_break_the_page(tmp_path_factory, tmp_path, browser):
    """A tag named ``<!--<script>...`` is embedded as JSON the browser cannot misread: the page's
    script runs, reads the name back verbatim, predicts, and shows the name as text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve_abuse import HOSTILE, hostile_model

    model = shared_model(tmp_path_factory)
    photo = sorted((model.parent / "data" / "images").glob("*.jpg"))[0]
    folder = hostile_model(model, tmp_path)
    with running_server(folder, log=tmp_path / "server.log") as (url, _):
        browser.get(url + "/")
        got = browser.execute_script("return CONFIG.tasks.find(t => t.name === 'pattern').classes[0]")
        assert got == HOSTILE
        assert "model: hostile-model" in browser.find_element(By.ID, "model").text
        assert browser.execute_script("return document.scripts.length") == 1
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, 90).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".card .bar")))
        assert "photo" in browser.find_element(By.ID, "status").text
        chips = [c.text for c in browser.find_elements(By.CSS_SELECTOR, ".card .tag")]
        assert any(c.startswith(HOSTILE) for c in chips), chips
        assert browser.execute_script("return document.scripts.length") == 1   # nothing injected


def test_api_docs_render_offline(tmp_path_factory, tmp_path, browser):
    """``/docs`` (Swagger UI) and ``/redoc`` render from the server's own assets (no CDN)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = shared_model(tmp_path_factory)
    with running_server(model, log=tmp_path / "server.log") as (url, _):
        browser.get(url + "/docs")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 10)
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/predict", "/v2/models/{name}/infer", "/v1/models/{name}:predict"} <= paths, paths
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and all(u.startswith(url) for u in loaded), loaded
        browser.get(url + "/redoc")
        wait.until(lambda d: "/v2/models/{name}/infer" in d.find_element(By.TAG_NAME, "body").text)
