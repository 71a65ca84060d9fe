"""Runs the teaching notebooks top to bottom and writes executed copies.

The notebooks in this folder are stored without outputs. This script
executes them with `nbclient` (each in a fresh kernel, in this folder, with
this checkout's `keras_transfer` first on the path), stops at the first
failing cell, and writes the executed copies (outputs and figures included)
to an output folder, never over the originals.

Run:
    python notebooks/run_notebooks.py                        # full mode, build/notebooks/
    python notebooks/run_notebooks.py --quick 03_text_transfer.ipynb
    python notebooks/run_notebooks.py --quick --jobs 2          # two kernels at once

`--quick` sets `NOTEBOOK_QUICK=1`: the notebooks run the same code on less
data and fewer steps (what the tests use).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIGURE_TAG = "figure"  # code cells tagged so must draw at least one figure


def notebook_names() -> list[str]:
    """The notebooks of this folder, in order."""
    return sorted(name for name in os.listdir(HERE) if name.endswith(".ipynb"))


def execute(name: str, *, quick: bool = False, timeout: int = 1800, output_dir: str | None = None):
    """Executes one notebook; returns the executed `nbformat` notebook.

    Args:
        name: file name of a notebook in this folder.
        quick: bool. Run the short variant (`NOTEBOOK_QUICK=1`).
        timeout: int. Seconds any one cell may take.
        output_dir: str, optional. Where to write the executed copy (also
            written when a cell fails, to show where).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed.
    """
    import nbclient
    import nbformat

    notebook = nbformat.read(os.path.join(HERE, name), as_version=4)
    # The kernel gets its own environment (this checkout's package first), so that
    # several notebooks can run at once from threads without touching os.environ.
    env = dict(os.environ, NOTEBOOK_QUICK="1" if quick else "0",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": HERE}})
    try:
        client.execute(env=env)
    finally:
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            nbformat.write(notebook, os.path.join(output_dir, name))
    return notebook


def figure_problems(notebook) -> list[str]:
    """What is wrong with a run's figures: figure cells without one, stray reprs."""
    problems = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        pictures = [o for o in outputs if "image/png" in o.get("data", {})]
        if FIGURE_TAG in cell.metadata.get("tags", []) and not pictures:
            problems.append(f"cell {index} is tagged '{FIGURE_TAG}' but drew no figure")
        for output in outputs:
            data = output.get("data", {})
            text = data.get("text/plain", "")
            if set(data) == {"text/plain"} and text.startswith("<matplotlib"):
                problems.append(f"cell {index} shows a stray {text[:40]!r}")
    return problems


def _run(name: str, quick: bool, output_dir: str) -> str | None:
    """Executes one notebook and prints one line about it; returns why it failed, or None."""
    start = time.perf_counter()
    try:
        notebook = execute(name, quick=quick, output_dir=output_dir)
    except Exception as error:  # noqa: BLE001 - report every notebook, then fail
        reason = str(error).strip().splitlines()[-1][:300]
        print(f"{name}: FAILED after {time.perf_counter() - start:.0f} s: {reason}", flush=True)
        return reason
    problems = figure_problems(notebook)
    figures = sum("image/png" in o.get("data", {}) for c in notebook.cells
                  if c.cell_type == "code" for o in c.outputs)
    print(f"{name}: {time.perf_counter() - start:.0f} s, {figures} figures"
          + (f"; {'; '.join(problems)}" if problems else ""), flush=True)
    return "; ".join(problems) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="the short variant")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once, each in its own kernel (default: 1)")
    parser.add_argument("--output", default=os.path.join(ROOT, "build", "notebooks"),
                        help="folder of the executed copies (default: build/notebooks)")
    args = parser.parse_args()
    names = [os.path.basename(name) for name in args.names] or notebook_names()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        reasons = list(pool.map(lambda name: _run(name, args.quick, args.output), names))
    failed = [name for name, reason in zip(names, reasons) if reason is not None]
    print(f"{len(names)} notebook(s) in {time.perf_counter() - start:.0f} s; "
          f"executed copies in {args.output}")
    if failed:
        sys.exit(f"Failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
