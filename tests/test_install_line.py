"""The README's install line for a machine without TensorFlow is the one CI's JAX environment uses.

The Makefile builds `.venv-jax` from `JAX_USER_PACKAGES` (plus test-only
packages), and `make test` runs this module there: the README's line must be
that list, and everything the package imports on JAX must come from it.
"""

import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

from processes import ROOT, child_env

MARKER = "<!-- install-without-tensorflow -->"


def makefile_list(name: str) -> list[str]:
    """A Makefile variable's words, with the variables it names expanded."""
    text = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read().replace("\\\n", " ")
    (line,) = re.findall(rf"^{name} = (.*)$", text, re.MULTILINE)
    words = []
    for word in shlex.split(line):
        inner = re.fullmatch(r"\$\((\w+)\)", word)
        words += makefile_list(inner.group(1)) if inner else [word]
    return words


def readme_lines() -> list[list[str]]:
    """The `pip install` commands of the README's code block after `MARKER`."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert MARKER in text, f"README.md lost its {MARKER} section"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()
            if line.startswith("pip install")]


def normalized(requirement: str) -> str:
    name = re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_readme_line_is_the_makefiles_list():
    packages, no_deps = readme_lines()
    assert packages[:2] == ["pip", "install"] and no_deps[:3] == ["pip", "install", "--no-deps"]
    assert packages[2:] == makefile_list("JAX_USER_PACKAGES")
    assert no_deps[3:] == ["keras-transfer", "keras-hub"]
    assert set(makefile_list("JAX_USER_PACKAGES")) <= set(makefile_list("JAX_PACKAGES"))


# Imports the package, every module of it and KerasHub with the modules of
# the packages the line does not install made unimportable, as where they are
# not installed (optional imports, such as Keras's of scikit-learn, fall back).
IMPORT_ALL = """
import importlib, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1]))

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NotInstalled())
import keras_transfer, keras_hub
for module in pkgutil.iter_modules(keras_transfer.__path__):
    importlib.import_module("keras_transfer." + module.name)
assert keras_transfer.ImageTransferModel and keras_hub.models.BertBackbone
"""


def installed_by_the_line() -> set[str]:
    """The distributions the line installs: its packages and all they depend on
    (markers and extras included: a superset), and the two --no-deps packages."""
    todo = [normalized(p) for p in makefile_list("JAX_USER_PACKAGES")]
    installed = {"keras-transfer", "keras-hub"}
    while todo:
        name = todo.pop()
        if name in installed:
            continue
        installed.add(name)
        try:
            todo += [normalized(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass
    return installed


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="checks an environment without TensorFlow (make test: .venv-jax)")
def test_the_line_installs_everything_the_package_imports_on_jax(tmp_path):
    import json

    installed = installed_by_the_line()
    blocked = sorted(module for module, owners in
                     importlib.metadata.packages_distributions().items()
                     if module != "keras_transfer"
                     and not {normalized(d) for d in owners} & installed)
    assert "sklearn" in blocked  # a test dependency, not the package's
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(blocked)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=child_env(tmp_path, KERAS_BACKEND="jax", PYTHONPATH=ROOT))
    assert result.returncode == 0, (
        "keras_transfer needs a package the README's line (the Makefile's JAX_USER_PACKAGES) "
        "does not install: " + result.stderr[-2000:])
