"""Will a language model fit: the estimates and `keras-transfer doctor`'s language-model lines."""

import pytest

from keras_transfer.doctor import format_language_model_report, language_model_report, wheel_cpu_warnings
from keras_transfer.lm_memory import GPT_J_6B, SMOLLM2_135M, estimate_lm_memory

GIB = 2**30


def test_weights_scale_with_the_dtype():
    sizes = {d: estimate_lm_memory(GPT_J_6B, "inference", d)["weights"]
             for d in ("float32", "bfloat16", "int8")}
    assert sizes["float32"] == 2 * sizes["bfloat16"] == 4 * GPT_J_6B.parameters
    assert GPT_J_6B.parameters < sizes["int8"] < 1.01 * GPT_J_6B.parameters  # plus row scales


def test_training_costs_more_than_inference_and_lora_less_than_full():
    for model in (GPT_J_6B, SMOLLM2_135M):
        totals = [estimate_lm_memory(model, m, "bfloat16")["total"]
                  for m in ("inference", "lora", "full")]
        assert totals[0] < totals[1] < totals[2]
    full = estimate_lm_memory(GPT_J_6B, "full", "float32")
    assert full["trained"] == 3 * full["weights"]  # gradients and AdamW's two moments
    assert not estimate_lm_memory(GPT_J_6B, "full", "int8")["possible"]


def test_activations_grow_faster_than_the_sequence():
    short, long = (estimate_lm_memory(GPT_J_6B, "lora", "bfloat16", sequence_length=n)
                   for n in (512, 2048))
    assert long["activations"] > 4 * short["activations"]  # attention scores: quadratic


def test_report_on_a_machine_with_8_gib():
    rows = {(r["model"], r["mode"], r["dtype"]): r for r in language_model_report(8 * GIB)}
    assert rows["GPT-J-6B", "inference", "int8"]["fits"]
    assert not rows["GPT-J-6B", "inference", "bfloat16"]["fits"]
    assert "int8" in rows["GPT-J-6B", "inference", "bfloat16"]["advice"]
    assert "LoRA" in rows["GPT-J-6B", "full", "float32"]["advice"]
    assert rows["SmolLM2-135M", "full", "float32"]["fits"]
    text = format_language_model_report(list(rows.values()), {"missing": ["avx"]})
    assert "GPT-J-6B      full      int8" in text and "n/a" in text
    assert "CPU lacks AVX: required by TensorFlow" in text


def test_wheel_cpu_warnings():
    assert wheel_cpu_warnings({"missing": []}) == []
    assert [w.split(":")[0] for w in wheel_cpu_warnings({"missing": ["fma", "avx2", "sse4_2"]})] \
        == ["CPU lacks AVX2", "CPU lacks FMA"]


@pytest.mark.parametrize("bad", [("training", "float32"), ("lora", "float16")])
def test_unknown_mode_or_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="Received mode="):
        estimate_lm_memory(GPT_J_6B, *bad)


def test_doctor_command_prints_the_language_models(capsys):
    from keras_transfer import cli

    assert cli.main(["doctor", "--backbone", "none", "--language-models"]) == 0
    out = capsys.readouterr().out
    assert "Language models (batch 1 x 512 tokens" in out and "GPT-J-6B      lora" in out
