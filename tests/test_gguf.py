"""GGUF files into KerasHub Llama: tiny synthetic files for the mapping, the tokenizer and the
refusals; SmolLM2-135M itself (marked `large`) against an independent NumPy forward pass."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from keras_transfer import gguf as kt_gguf  # noqa: E402
from keras_transfer.errors import BackboneError, WeightsError  # noqa: E402
from llama_reference import llama_logits  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_symbols():
    """GPT-2's printable stand-ins for the 256 bytes (the base of a byte-level BPE)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_tiny_llama(path, *, architecture="llama", tokenizer_model="gpt2",
                     q_type=gguf.GGMLQuantizationType.Q8_0, tied=True, seed=0):
    """A 2-layer Llama GGUF file with tensors in F32, F16, Q8_0 and Q4_1."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + _byte_symbols() + [m.replace(" ", "") for m in MERGES]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)

    def add(name, shape, qtype=gguf.GGMLQuantizationType.F32, scale=0.3):
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, values)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.Q8_1:  # no quantizer in gguf: raw blocks
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 255, (shape[0], shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), HIDDEN), gguf.GGMLQuantizationType.F16, 1.0)
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), scale=1.0)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), scale=1.0)
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), q_type)
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN), gguf.GGMLQuantizationType.Q4_1)
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN))
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN))
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), gguf.GGMLQuantizationType.Q8_0)
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
    add("output_norm.weight", (HIDDEN,), scale=1.0)
    if not tied:
        add("output.weight", (len(tokens), HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def keras_logits(lm, ids):
    outputs = lm.backbone({"token_ids": np.array([ids], "int32"),
                           "padding_mask": np.ones((1, len(ids)), "int32")})
    return np.asarray(lm.backbone.token_embedding(outputs, reverse=True))[0]


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_matches_numpy_reference(tmp_path, tied):
    path = write_tiny_llama(tmp_path / "tiny.gguf", tied=tied)
    lm = kt_gguf.load_gguf(path, sequence_length=16)
    config = lm.backbone.get_config()
    assert (config["num_layers"], config["num_key_value_heads"], config["tie_word_embeddings"],
            config["rope_max_wavelength"]) == (LAYERS, KV_HEADS, tied, 50000.0)
    ids = [1, 40, 75, 3 + 256 + 3, 12, 2, 7]
    np.testing.assert_allclose(keras_logits(lm, ids), llama_logits(path, ids), atol=1e-4)


def test_unpermute_rotary_inverts_llama_cpp_order():
    # llama.cpp's converter interleaves each head's two halves: rows (a0 a1 b0 b1) -> (a0 b0 a1 b1).
    weight = np.arange(2 * 4)[:, None] * np.ones((1, 3))
    interleaved = weight.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)
    np.testing.assert_array_equal(kt_gguf.unpermute_rotary(interleaved, heads=2), weight)


def test_tokenizer_from_file_vocabulary_merges_and_chat_template(tmp_path):
    lm = kt_gguf.load_gguf(write_tiny_llama(tmp_path / "tiny.gguf"), sequence_length=16)
    tokenizer = lm.preprocessor.tokenizer
    hello = [int(i) for i in np.asarray(tokenizer("hello world"))]
    vocabulary = list(tokenizer.get_vocabulary())
    assert [vocabulary[i] for i in hello] == ["hello", "Ġw", "o", "r", "l", "d"]
    assert tokenizer.detokenize(hello) == "hello world"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    ids = [int(i) for i in np.asarray(tokenizer(prompt))]
    assert ids[:2] == [1, vocabulary.index("u")] and ids.count(1) == 2 and ids.count(2) == 1
    # Generation stops at <|im_end|> and does not add a second start token.
    assert tokenizer.end_token_id == 2
    packed = lm.preprocessor.generate_preprocess([prompt], sequence_length=32)
    assert list(np.asarray(packed["token_ids"])[0][:len(ids)]) == ids


def test_refuses_other_architecture(tmp_path):
    path = write_tiny_llama(tmp_path / "other.gguf", architecture="gpt2")
    with pytest.raises(BackboneError, match="architecture 'gpt2'"):
        kt_gguf.load_gguf(path)


def test_refuses_sentencepiece_tokenizer(tmp_path):
    path = write_tiny_llama(tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(WeightsError, match="tokenizer is 'llama'"):
        kt_gguf.load_gguf(path)


def test_refuses_unknown_quantization(tmp_path):
    path = write_tiny_llama(tmp_path / "q81.gguf", q_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(WeightsError, match="blk.0.attn_q.weight.*Q8_1"):
        kt_gguf.load_gguf(path)


def test_refuses_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")
    with pytest.raises(WeightsError, match="not a readable GGUF file"):
        kt_gguf.load_gguf(path)
    with pytest.raises(WeightsError, match="not a file"):
        kt_gguf.load_gguf(tmp_path / "missing.gguf")


@pytest.mark.large
def test_smollm2_logits_match_numpy_reference():
    checkpoint = kt_gguf.read_gguf(kt_gguf.smollm2_path())  # read once for both (10 s)
    lm = kt_gguf.load_gguf(checkpoint)
    ids = [int(i) for i in np.asarray(lm.preprocessor.tokenizer("The capital of France is"))]
    logits, reference = keras_logits(lm, ids), llama_logits(checkpoint, ids)
    np.testing.assert_allclose(logits, reference, atol=1e-4)
    assert lm.preprocessor.tokenizer.detokenize([int(np.argmax(logits[-1]))]) == " Paris"


def test_generate_and_stream_agree_greedily(tmp_path):
    from keras_transfer.generation import generate, stream

    lm = kt_gguf.load_gguf(write_tiny_llama(tmp_path / "tiny.gguf"), sequence_length=24)
    lm.jit_compile = False  # XLA would double this test's time on a model this small
    streamed = "".join(stream(lm, "hello", max_length=24))
    assert streamed.strip() == generate(lm, "hello", max_length=24)
    assert len(streamed) > 0
    sampled = ["".join(stream(lm, "hello", max_length=12, chat=False, temperature=5.0,
                              top_k=50, seed=seed)) for seed in (1, 2, 1)]
    assert sampled[0] != sampled[1] and sampled[0] == sampled[2]  # the seed decides


def test_make_sampler_options():
    from keras_transfer.errors import DataError
    from keras_transfer.generation import make_sampler

    assert type(make_sampler("top_k", top_k=7)).__name__ == "TopKSampler"
    assert make_sampler("top_k", top_k=7).k == 7
    assert make_sampler("top_p", top_p=0.5, temperature=0.7).p == 0.5
    with pytest.raises(DataError, match="temperature=0"):
        make_sampler("top_k", temperature=0)
    with pytest.raises(DataError, match="sampler='beam'"):
        make_sampler("beam")


def test_generate_command_streams_the_answer(tmp_path, capsys):
    from keras_transfer import cli
    from keras_transfer.generation import stream

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    assert cli.main(["generate", "hello", "--model", path, "--max-length", "32"]) == 0
    lm = kt_gguf.load_gguf(path, sequence_length=32)
    assert capsys.readouterr().out == "".join(stream(lm, "hello", max_length=32)) + "\n"
    assert cli.main(["generate", "hello", "--model", str(tmp_path / "none.gguf")]) == 2
    assert "not a file" in capsys.readouterr().err


def test_gguf_model_saves_and_reloads_whole_and_adapters_alone(tmp_path):
    import keras

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    lm = kt_gguf.load_gguf(path, sequence_length=16)
    lm.backbone.enable_lora(2)
    for variable in lm.backbone.trainable_weights:  # adapters as if trained
        variable.assign(np.random.default_rng(0).normal(0, 0.5, variable.shape))
    ids = [1, 40, 75, 12]
    expected = keras_logits(lm, ids)
    lm.save(tmp_path / "lm.keras")
    reloaded = keras.saving.load_model(tmp_path / "lm.keras")
    np.testing.assert_allclose(keras_logits(reloaded, ids), expected, atol=1e-5)
    assert reloaded.backbone.tie_word_embeddings  # KerasHub's config alone would lose it
    assert reloaded.preprocessor.tokenizer.chat_template == CHATML
    lm.backbone.save_lora_weights(str(tmp_path / "adapters.lora.h5"))
    fresh = kt_gguf.load_gguf(path, sequence_length=16)
    fresh.backbone.enable_lora(2)
    fresh.backbone.load_lora_weights(str(tmp_path / "adapters.lora.h5"))
    np.testing.assert_allclose(keras_logits(fresh, ids), expected, atol=1e-5)


def test_perplexity_counts_tokens_not_batches_and_knows_ignorance(tmp_path):
    import keras_transfer as kt

    lm = kt_gguf.load_gguf(write_tiny_llama(tmp_path / "tiny.gguf"), sequence_length=16)
    texts = ["hello world", "hello", "world hello hello world hello", "he"]
    one_by_one = kt.perplexity(lm, texts, batch_size=1)
    # Batches of other shapes round the float32 logits differently: about 16 nats
    # a token here, so the perplexity moves by about 16 x 1e-7 (7e-7 in a clean-clone
    # run); averaging per batch instead of per token would be off by far more.
    assert kt.perplexity(lm, texts, batch_size=3) == pytest.approx(one_by_one, rel=1e-5)
    assert 1.0 < one_by_one
    each = kt.perplexity(lm, texts, batch_size=3, per_text=True)
    np.testing.assert_allclose(each, [kt.perplexity(lm, [t]) for t in texts], rtol=1e-5)
    for variable in lm.backbone.weights:  # uniform next-token scores: perplexity = vocabulary
        variable.assign(np.zeros(variable.shape))
    vocabulary = lm.backbone.vocabulary_size
    assert kt.perplexity(lm, texts) == pytest.approx(vocabulary, rel=1e-6)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        kt.perplexity(lm, [])


def test_docstring_corpus_splits_by_module(tmp_path):
    import keras_transfer as kt

    doc = "x" * 250
    for module in ("alpha", "beta", "gamma", "delta", "tests/hidden"):
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{module}.py").write_text(
            f'"""{module} {doc}"""\n\n\ndef f():\n    """{module} f {doc}"""\n\n\n'
            f'def g():\n    """short"""\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    train, held_out = kt.docstring_corpus(str(tmp_path), held_out_share=0.5)
    found = sorted(train + held_out)
    assert found == sorted(f"{m}{s} {doc}" for m in ("alpha", "beta", "gamma", "delta")
                           for s in ("", " f"))
    modules = lambda docs: {d.split()[0] for d in docs}  # noqa: E731
    assert modules(train) and modules(held_out) and not modules(train) & modules(held_out)
    assert kt.docstring_corpus(str(tmp_path), held_out_share=0.5) == (train, held_out)
    with pytest.raises(ValueError, match="between 0 and 1"):
        kt.docstring_corpus(str(tmp_path), held_out_share=1.0)
    with pytest.raises(ValueError, match="not a folder"):
        kt.docstring_corpus(str(tmp_path / "nope"))
