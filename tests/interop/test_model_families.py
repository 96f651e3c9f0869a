"""Model families beyond Llama (docs/training.md, "Supported model families"):
Qwen3 (per-head q/k RMSNorm, head_dim independent of hidden/heads), OLMo2
(norms after attention and the MLP, q/k RMSNorm over the whole projection),
SmolLM3 (layers without rotary), sliding-window attention (Qwen2's on some
layers, Mistral's on all), Gemma 1/2/3 (text), and the yarn, dynamic and
longrope RoPE scalings, against the real transformers.

For each family one tiny model (hidden 64, 2-4 layers) is built by
transformers with random weights perturbed so that norms and biases matter,
and saved as a Hub folder. Then:
- loom's logits on that folder agree with transformers' within 1e-4 (fp32);
- 20 greedy tokens of `loom generate` are transformers' own;
- 3 steps of `loom train` from model.init_from export a folder that
  transformers loads as the same class with no missing or unexpected keys
  and whose logits are loom's own of the trained checkpoint;
- tp 2, pp 2 and dp 2 x tp 2 (with sequence parallelism) runs of those 3
  steps log the single rank's losses within 1e-5 (for each option once).
The prompts (40 tokens) and training rows (32) are longer than the windows.
"""
import json
import shutil

import pytest
import torch

from hub_families import (LOSS_TOLERANCE, SEQ_LEN, VOCAB, check_greedy_generation, check_logits, check_trained_export,
                          loom_logits, make_family, train as train_family)

FAMILIES = {
    # head_dim 24 while hidden / heads is 16; biases on all four projections.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, attention_bias=True, max_position_embeddings=128,
        rope_theta=1000000.0, tie_word_embeddings=False)),
    # q_norm over 4 * 16 features, k_norm over 2 * 16.
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Layers 1 and 3 without rotary: one on each stage of pp 2. Tied, as SmolLM3.
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, no_rope_layers=[1, 0, 1, 0], max_position_embeddings=128, mlp_bias=True,
        tie_word_embeddings=True)),
    # Sliding-window attention on layers 1 and 2 of 3 (max_window_layers 1),
    # a window of 8 tokens: shorter than the prompts and the training rows.
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
        max_position_embeddings=128, tie_word_embeddings=False)),
    # Mistral's window on every layer (Mistral-7B-v0.1 has one).
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=6, max_position_embeddings=128, tie_word_embeddings=False)),
    # Gemma: scaled embeddings, 1 + w norms, GeGLU (tanh), tied; MQA.
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh", max_position_embeddings=128)),
    # Gemma 2: norms around both blocks, soft-capping small enough to bite,
    # query_pre_attn_scalar apart from head_dim, windows on layers 0 and 2.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0, sliding_window=8, max_position_embeddings=128)),
    # Gemma 3 (text): per-head q/k norms, the sliding layers' own rotary
    # theta, linear scaling on the global layer only.
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
        max_position_embeddings=128)),
    # Phi-3: fused qkv_proj and gate_up_proj in the Hub files, a window on
    # every layer, longrope past its original context of 16 tokens (kept
    # at the top level, as Phi-3's configs do).
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=12, max_position_embeddings=64, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.1, 1.6, 2.0, 2.5, 3.0],
                      "long_factor": [1.0, 2.0, 3.0, 4.0, 6.0, 9.0, 12.0, 16.0]})),
    # RoPE scaling with transformers' formulas, on a Llama: the 40-token
    # prompts run past each one's original context.
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "beta_fast": 16.0, "beta_slow": 2.0})),
    # Dynamic NTK scales only past max_position_embeddings (32): the logits'
    # 40-token prompt and the last greedy tokens.
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, rope_scaling={"rope_type": "dynamic", "factor": 3.0})),
    # LongRoPE: the short factors up to 16 tokens, the long ones beyond (and
    # the derived factor 64 / 16 gives the attention factor).
    "llama_longrope": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
        rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 16,
                      "short_factor": [1.0, 1.1, 1.3, 1.2, 1.5, 1.9, 2.4, 3.0],
                      "long_factor": [1.0, 1.5, 2.5, 3.5, 5.0, 8.0, 12.0, 16.0]})),
}
# The families whose options the layouts check: mistral's window is qwen2's
# on every layer, gemma's options are a part of gemma2's, and dynamic NTK
# changes nothing up to max_seq_len, the longest a run trains on.
FAMILY_LAYOUTS = {"qwen3", "olmo2", "smollm3", "qwen2_window", "llama_yarn", "llama_longrope", "gemma2", "gemma3_text",
                  "phi3"}
ARCHITECTURE = {"qwen2_window": "qwen2", "mistral_window": "mistral", "llama_yarn": "llama", "llama_dynamic": "llama",
                "llama_longrope": "llama"}

LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    "pp2": (2, {"parallel.pp": 2}),
    "dp2_tp2_sp": (4, {"parallel.tp": 2, "parallel.dp": 2, "parallel.sequence_parallel": "true"}),
}


def train(tmp, family, name, ranks=1, **sets):
    """3 steps of `loom train` from the family's Hub folder; returns the run folder and its losses."""
    run, steps = train_family(tmp, FAMILIES[family][2], ARCHITECTURE.get(family, family), name, ranks, **sets)
    return run, [row["loss"] for row in steps]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, transformers model, scratch folder holding hf/ and data/, the single-rank run)."""
    name = request.param
    model, tmp = make_family(FAMILIES, name, tmp_path_factory)
    run, losses = train(tmp, name, "single")
    return name, model, tmp, run, losses


def test_logits_match_transformers(family):
    name, model, tmp, _, _ = family
    check_logits(name, model, tmp)


def test_greedy_generation_matches_transformers(family):
    """20 + 20 tokens: past the windows and, while decoding, past the dynamic and longrope thresholds."""
    name, model, tmp, _, _ = family
    check_greedy_generation(name, model, tmp)


def test_trained_export_loads_as_the_same_class_with_loom_logits(family):
    name, model, tmp, run, losses = family
    check_trained_export(name, model, tmp, run, losses)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_reproduces_single_rank_losses(family, layout):
    name, _, tmp, _, single = family
    if name not in FAMILY_LAYOUTS:
        pytest.skip(f"{name}'s option has its layouts checked with another family")
    ranks, sets = LAYOUTS[layout]
    _, losses = train(tmp, name, layout, ranks, **sets)
    diffs = [abs(a - b) for a, b in zip(losses, single)]
    assert max(diffs) < LOSS_TOLERANCE, f"{name} {layout}: {losses} vs single rank {single}"


def test_options_round_trip_through_config_json(family):
    name, model, _, run, _ = family
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config.get("no_rope_layers") == ([1, 0, 1, 0] if name == "smollm3" else None)
    assert config.get("sliding_window") == getattr(model.config, "sliding_window", None)
    if name in ("qwen2_window", "gemma2", "gemma3_text"):
        assert config["layer_types"] == model.config.layer_types


def test_phi3_export_keeps_the_fused_projections(family):
    name, model, _, run, _ = family
    if name != "phi3":
        pytest.skip("only phi3 fuses its projections")
    from safetensors import safe_open
    with safe_open(str(run / "hf" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"} <= names
        assert not any("q_proj" in n or "gate_proj." in n for n in names), names
        assert f.get_tensor("model.layers.0.self_attn.qkv_proj.weight").shape == (4 * 16 + 2 * 2 * 16, 64)


def test_the_window_changes_the_logits(family):
    """The prompt is longer than the window, so a model without it differs."""
    name, model, tmp, _, _ = family
    if not getattr(model.config, "sliding_window", None):
        pytest.skip("no window")
    config = json.loads((tmp / "hf" / "config.json").read_text())
    unwindowed = tmp / "unwindowed"
    shutil.copytree(tmp / "hf", unwindowed)
    config.update(sliding_window=1000)  # longer than the prompt: no window
    (unwindowed / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    windowed = loom_logits(tmp / "hf", ids, tmp / "windowed.safetensors")
    full = loom_logits(unwindowed, ids, tmp / "full.safetensors")
    assert (windowed[:, 10:] - full[:, 10:]).abs().max().item() > 1e-3
