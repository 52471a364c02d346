"""Sources and image validation: every problem is named, nothing is lost."""
import io

import numpy as np
import pytest
from PIL import Image

from catalens.embed.decode import DecodeJob, decode_one
from catalens.ingest.catalogue import read_file_bytes
from catalens.ingest.images import ImageProblem, Preprocess, decode, load_rgb
from catalens.ingest.open import open_catalogue
from conftest import jpeg_bytes

PRE = Preprocess(size=32, resize=36)


def test_folder_source_with_splits(tiny_folder):
    cat = open_catalogue(tiny_folder)
    assert cat.source == "folder"
    assert len(cat) == 28
    assert cat.frame["split"].value_counts().to_dict() == {"train": 16, "val": 6, "test": 6}
    assert cat.tasks[0].classes == ["blue", "red"]
    assert cat.frame.loc[cat.frame["id"] == "train/red/red0.jpg", "label"].item() == "red"


def test_folder_without_classes_says_how_to_fix(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(ValueError, match="put each class in its own subfolder"):
        open_catalogue(tmp_path)


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_catalogue(tmp_path / "nope")


def _table(tmp_path, rows, tags=None, spec_extra=""):
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = ["sku,cat,sub,title,split"] + rows
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    if tags:
        (tmp_path / "tags.csv").write_text("\n".join(tags) + "\n")
    spec = ("table: t.csv\nimage: img/{sku}.jpg\nid: sku\nsplit: split\ntext: title\ntasks:\n"
            "  cat: {kind: class}\n  sub: {kind: class, parent: cat}\n" + spec_extra)
    (tmp_path / "d.yaml").write_text(spec)
    return tmp_path / "d.yaml"


def test_table_source_hierarchy_tags_and_missing_labels(tmp_path):
    p = _table(tmp_path, ["1,top,shirt,Blue shirt,train", "2,top,,Red top,val", "3,bottom,jeans,,test"],
               tags=["sku,striped,checked", "1,1,0", "3,0,1"],
               spec_extra="  pattern: {kind: tags, table: tags.csv, key: sku, columns: [striped, checked]}\n")
    cat = open_catalogue(p)
    assert cat.task_names == ["cat", "sub", "pattern"]
    assert cat.task("sub").parent == "cat"
    y = cat.encode()
    assert y["cat"].tolist() == [1, 1, 0]
    assert y["sub"].tolist() == [1, -1, 0]        # missing label masked, not guessed
    assert y["pattern"][0].tolist() == [1, 0]
    assert np.isnan(y["pattern"][1]).all()        # product 2 absent from tag table: unknown
    assert [t if isinstance(t, str) else None for t in cat.frame["text"]] == ["Blue shirt", "Red top", None]
    assert cat.frame["path"].iat[0].endswith("img/1.jpg")


def test_table_unknown_key_and_bad_split(tmp_path):
    p = _table(tmp_path, ["1,top,shirt,x,train"])
    p.write_text(p.read_text() + "colour: c\n")
    with pytest.raises(ValueError, match="colour: Extra inputs are not permitted"):
        open_catalogue(p)
    p = _table(tmp_path, ["1,top,shirt,x,training", "2,top,shirt,x,holdout"])
    with pytest.raises(ValueError, match=r"row 3: split column 'split' holds 'holdout'"):
        open_catalogue(p)


def test_table_missing_column_and_bad_tag_value(tmp_path):
    p = _table(tmp_path, ["1,top,shirt,x,train"], spec_extra="  colour: {kind: class}\n")
    with pytest.raises(ValueError, match="task 'colour': column 'colour' is not in 't.csv'"):
        open_catalogue(p)
    p = _table(tmp_path, ["1,top,shirt,x,train"], tags=["sku,striped", "1,2"],
               spec_extra="  pattern: {kind: tags, table: tags.csv, key: sku, columns: [striped]}\n")
    with pytest.raises(ValueError, match=r"tag 'striped' of id '1' \('tags.csv' row 2\) holds '2'; expected 0 or 1 "
                                         r"\(also accepted: true/false, yes/no\); leave the cell empty when unknown"):
        open_catalogue(p)


def test_parent_must_exist(tmp_path):
    p = _table(tmp_path, ["1,top,shirt,x,train"])
    p.write_text(p.read_text().replace("parent: cat", "parent: department"))
    with pytest.raises(ValueError, match="names parent 'department'"):
        open_catalogue(p)


@pytest.mark.parametrize("data,code", [
    (b"", "empty"),
    (b"hello, I am text", "not_an_image"),
    (jpeg_bytes(size=(300, 400))[:3000], "truncated"),
])
def test_bad_bytes_give_named_problem(data, code):
    with pytest.raises(ImageProblem) as e:
        load_rgb(data, PRE)
    assert e.value.code == code
    assert "fix:" in str(e.value)


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageProblem) as e:
        load_rgb(jpeg_bytes(size=(400, 300)), PRE, max_pixels=10_000)
    assert e.value.code == "decompression_bomb"
    assert "400x300 = 120,000 pixels > limit 10,000" in e.value.detail


@pytest.mark.parametrize("mode,note", [("CMYK", "converted CMYK to RGB"), ("L", "converted L to RGB"),
                                       ("P", "converted P to RGB")])
def test_modes_converted_to_rgb(mode, note):
    fmt = "PNG" if mode == "P" else "JPEG"
    notes = []
    px = load_rgb(jpeg_bytes(mode=mode, fmt=fmt), PRE, notes=notes)
    assert px.shape == (32, 32, 3) and px.dtype == np.uint8
    assert notes == [note]


def test_rgba_composited_on_white():
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))    # fully transparent red
    buf = io.BytesIO()
    im.save(buf, "PNG")
    notes = []
    out = decode(buf.getvalue(), notes=notes)
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]
    assert notes == ["composited RGBA alpha on white"]


def test_16bit_scaled_not_clipped():
    a = np.full((20, 20), 32896, np.uint16)             # mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    notes = []
    out = np.asarray(decode(buf.getvalue(), notes=notes))
    assert abs(int(out[0, 0, 0]) - 128) <= 1
    assert "16-bit" in notes[0]


def test_exif_orientation_applied():
    im = Image.new("RGB", (60, 30), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 30))                # left half red
    exif = Image.Exif()
    exif[0x0112] = 6                                     # rotate 90° clockwise on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    notes = []
    out = decode(buf.getvalue(), notes=notes)
    assert out.size == (30, 60)                          # portrait after orientation
    assert np.asarray(out)[5, 15, 0] > 200               # red now on top
    assert notes == ["applied EXIF orientation 6"]


def test_missing_file_reported_by_worker(tmp_path):
    job = DecodeJob(reader=read_file_bytes, pre=PRE)
    d = decode_one(3, str(tmp_path / "gone.jpg"), job)
    assert (d.row, d.problem) == (3, "missing")
    assert "gone.jpg" in d.detail


def test_cached_rows_are_not_decoded(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(jpeg_bytes())
    from catalens.embed.cache import content_hash

    job = DecodeJob(reader=read_file_bytes, pre=PRE, known=frozenset({content_hash(f.read_bytes())}))
    d = decode_one(0, str(f), job)
    assert d.cached and d.pixels is None
