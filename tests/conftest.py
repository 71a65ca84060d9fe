"""Shared test fixtures. Tests marked `large` run only with --run-large.

The suite runs on the Keras backend of `KERAS_BACKEND` (TensorFlow by
default). On another backend, tests marked `tensorflow` (tf.data inputs,
tf.distribute, SavedModel export) are skipped, and so are the modules in
`TENSORFLOW_MODULES`, which are about TensorFlow throughout.
"""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
# Modules about TensorFlow throughout (exports, strategies; docstring examples use tf.data).
TENSORFLOW_MODULES = ("test_export.py", "test_distribute.py", "test_backend_export.py",
                      "test_docstring_examples.py")
collect_ignore = [] if ON_TENSORFLOW else list(TENSORFLOW_MODULES)

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true", default=False,
                     help="also run tests marked large")


def pytest_collection_modifyitems(config, items):
    skip_large = pytest.mark.skip(reason="large test: run with --run-large (make test does)")
    skip_tf = pytest.mark.skip(reason=f"needs TensorFlow; Keras runs on {keras.backend.backend()}")
    for item in items:
        if "large" in item.keywords and not config.getoption("--run-large"):
            item.add_marker(skip_large)
        if "tensorflow" in item.keywords and not ON_TENSORFLOW:
            item.add_marker(skip_tf)


# Where weights and datasets come from: the offline checks run only when none answers.
DOWNLOAD_HOSTS = ("storage.googleapis.com", "www.kaggle.com")


def online(hosts=DOWNLOAD_HOSTS) -> bool:
    """Whether any of `hosts` accepts a connection on port 443 within 2 s."""
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=2).close()
            return True
        except OSError:
            continue
    return False


@pytest.fixture
def offline():
    """Skips a test of how a download fails when this machine can download."""
    if online():
        pytest.skip("online: this check is for offline machines")


@pytest.fixture(scope="session", autouse=True)
def feature_cache_root(tmp_path_factory):
    """Feature caches of every test go to a temporary folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_TRANSFER_CACHE", str(tmp_path_factory.mktemp("feature_cache")))
        yield


@pytest.fixture
def tiny_images():
    """40 random 32x32 RGB uint8 images and labels of 3 classes."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 40)
    return x, y


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 3 classes x 4 small PNG files, colours per class."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for label, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            image = rng.integers(0, 60, (36, 40, 3), dtype=np.uint8)
            image[..., label] += 180
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root
