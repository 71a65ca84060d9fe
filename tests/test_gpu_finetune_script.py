"""benchmarks/gpu_finetune.py: its quick path runs on the current backend, and both sides get the same data."""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_finetune.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_finetune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_finetune"] = module  # its dataclass looks itself up there
    sys.path.insert(0, os.path.dirname(SCRIPT))  # for its `machine` and `handwritten` imports
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return module


def test_text_sides_train_on_the_same_token_ids(script):
    """Ours tokenises the texts; the hand-written side gets ids made in numpy: they must agree."""
    import keras_hub

    vocabulary = script.synthetic_vocabulary()
    assert len(vocabulary) == script.MINILM["vocabulary_size"] == len(set(vocabulary))
    texts, tokens, labels = script.text_data(np.random.default_rng(0), 3, 10, 4, vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=vocabulary), sequence_length=10)
    made = preprocessor(texts)
    for key in ("token_ids", "segment_ids", "padding_mask"):
        np.testing.assert_array_equal(np.asarray(made[key]), tokens[key])
    assert labels.shape == (3,)


def test_without_a_gpu_the_small_configuration_fills_unset_flags(script):
    args = script.settle(script.parse_args(["--quick", "--batch-size", "5"]), has_gpu=False)
    assert (args.size, args.steps, args.rounds, args.batch_size) == (64, 1, 1, 5)
    args = script.settle(script.parse_args([]), has_gpu=True)
    assert (args.size, args.sequence_length, args.rounds) == (224, 128, 3)
    with pytest.raises(SystemExit):
        script.parse_args(["--models", "vgg16"])


# The script is for JAX GPU machines: its quick run (about 40 s on JAX) is a fast test
# of CI's JAX environment; on TensorFlow, where CI's time goes to TensorFlow's own
# tests, `python benchmarks/gpu_finetune.py --quick` checks it by hand.
@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="runs in the JAX environment (make test-jax)")
def test_quick_run_prints_a_ratio_per_configuration(script):
    """Both kinds of network, mixed precision on, tiny sizes, in a child process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--models", "mobilenet_v2,minilm",
         "--precisions", "mixed_float16", "--size", "32", "--sequence-length", "8",
         "--batch-size", "2", "--steps", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = run.stdout
    assert "backend" in out
    assert out.count("ratio ours / hand-written:") == 2, out
    table = out.split("ratio\n")[-1]
    assert "mobilenet_v2  mixed_float16  images" in table
    assert "minilm        mixed_float16  sequences" in table
    says_cpu = "NO GPU FOUND" in out and "CPU figures, not GPU figures" in out
    assert says_cpu == (not script.backend_devices()[1])
