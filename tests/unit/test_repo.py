"""The repository's own rules: notebooks without outputs, a parameters cell, a registered chapter."""
import json
import re
from pathlib import Path

import pytest

from ftbook import specs

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "chapters").glob("*.ipynb"))


def test_there_are_chapters():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"cell {i} has outputs"
            assert cell.get("execution_count") is None, f"cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_anatomy(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    source = "".join(tagged[0]["source"])
    assert re.search(r'^profile = "cpu"', source, re.M) and re.search(r"^seed = 0", source, re.M)
    spec = specs.resolve(path.stem)  # registered in ftbook.config
    for knob in spec.defaults:
        assert re.search(rf"^{knob} = ", source, re.M), f"knob {knob!r} missing from the parameters cell"
    after = "".join(code[code.index(tagged[0]) + 1]["source"])
    assert f'ftbook.setup("{path.stem}", globals())' in after, "setup must follow the parameters cell"
    first_md = "".join(nb["cells"][0]["source"])
    assert "colab.research.google.com" in first_md, "Colab badge"
    assert any("ClaimBook" in "".join(c["source"]) for c in code) and \
        any(".finish(" in "".join(c["source"]) for c in code), "claims table and run record"


def test_lock_pins_the_cpu_torch_and_pyproject_stays_loose():
    lock = (REPO / "requirements-lock.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", lock, re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"torch>=' in pyproject and "torch==" not in pyproject
