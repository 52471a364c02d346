"""How ``pytest -n auto`` splits this suite (tests/conftest.py): a renamed test or file would silently
undo a grouping and bring back the long serial tail, so the names the split relies on must exist."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import LONGEST_FIRST, SAME_EMBEDDINGS, _group

TESTS = Path(__file__).parent


def test_every_name_the_split_relies_on_exists():
    for name in SAME_EMBEDDINGS:
        file, test = name.split("::")
        assert re.search(rf"^def {test}\(", (TESTS / file).read_text(), re.M), name
    for unit in LONGEST_FIRST:
        assert unit == "clothing-small-lite0" or (TESTS / unit).is_file(), unit


def test_a_file_is_one_unit_and_the_clothing_tests_share_one():
    assert _group("tests/test_text.py::test_fusion_beats_each_alone_when_information_is_complementary") == "test_text.py"
    assert _group("tests/test_parity.py::test_cli_python_and_every_protocol_agree[single]") == "test_parity.py"
    units = {_group(f"tests/{name}") for name in SAME_EMBEDDINGS}
    assert units == {"clothing-small-lite0"}
    assert _group("tests/test_audit.py::test_planted_duplicates_are_found_exactly") == "test_audit.py"
