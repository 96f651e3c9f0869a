"""transformers -> loom import -> loom logits / generation / export -> transformers.

For each model shape, a model created by transformers is imported by loom;
loom's logits match transformers' within 1e-4 (fp32); greedy generation of 20
tokens gives the same ids; `loom export` of it loads with
AutoModelForCausalLM.from_pretrained with no missing or unexpected keys and
gives the same logits; the safetensors package reads every file loom wrote.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import make_hf_model, run_loom

CONFIGS = {
    # MHA, untied, odd sizes: 3 layers, hidden 96, vocab 211.
    "llama_mha_untied_3layers_hidden96": ("llama", dict(
        vocab_size=211, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # GQA 8:2, tied, Llama 3.1 rope scaling with a short original context so
    # the scaled frequencies matter at these positions.
    "llama_gqa_tied_llama3_rope": ("llama", dict(
        vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # Qwen2: q/k/v biases, GQA, large rope theta, untied.
    "qwen2_gqa_qkv_bias": ("qwen2", dict(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=1000000.0, tie_word_embeddings=False)),
    # MQA (one kv head), head_dim not hidden/heads, attention and MLP biases, tied.
    "llama_mqa_bias_head_dim32": ("llama", dict(
        vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=64)),
    # Mistral without a sliding window is Llama-shaped; linear rope scaling.
    "mistral_linear_rope": ("mistral", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
        max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}

TOLERANCE = 1e-4


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def loom_logits(tmp, model_dir, ids, tag):
    ids_path, out_path = tmp / f"ids-{tag}.safetensors", tmp / f"logits-{tag}.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(ids_path))
    run_loom("forward", model_dir, "--input-ids", ids_path, "--output", out_path)
    return load_file(str(out_path))["logits"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def imported(request, tmp_path_factory):
    """(name, hf model, its saved folder, loom checkpoint, loom export, scratch dir)."""
    name = request.param
    kind, config = CONFIGS[name]
    tmp = tmp_path_factory.mktemp(name)
    model = make_hf_model(kind, seed=len(name), **config)
    model.save_pretrained(tmp / "hf")
    run_loom("import", tmp / "hf", "--output", tmp / "ckpt")
    run_loom("export", tmp / "ckpt", "--output", tmp / "export")
    return name, model, tmp / "hf", tmp / "ckpt", tmp / "export", tmp


def test_loom_logits_match_transformers(imported):
    name, model, _, ckpt, _, tmp = imported
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    expected = hf_logits(model, ids)
    actual = loom_logits(tmp, ckpt, ids, "ckpt")
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff < TOLERANCE, f"{name}: max |loom - transformers| = {diff}"


def test_loom_reads_the_hub_folder_directly(imported):
    name, model, hf_dir, _, _, tmp = imported
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    diff = (loom_logits(tmp, hf_dir, ids, "hf") - hf_logits(model, ids)).abs().max().item()
    assert diff < TOLERANCE, f"{name}: {diff}"


def test_export_loads_in_transformers_with_the_same_logits(imported):
    name, model, _, _, export, _ = imported
    reloaded, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    # Mistral without a sliding window is the Llama architecture; loom exports it as Llama.
    expected_class = "LlamaForCausalLM" if name.startswith("mistral") else type(model).__name__
    assert type(reloaded).__name__ == expected_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    diff = (hf_logits(reloaded.eval(), ids) - hf_logits(model, ids)).abs().max().item()
    assert diff < TOLERANCE, f"{name}: {diff}"
    config = json.loads((export / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert config["torch_dtype"] == config["dtype"] == "float32"


def test_greedy_generation_matches_transformers(imported):
    name, model, _, ckpt, _, _ = imported
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    expected = out[0, prompt.shape[1]:].tolist()
    proc = run_loom("generate", ckpt, "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
                    "--greedy", "--max-new-tokens", 20)
    actual = [int(t) for t in proc.stdout.strip().split(",")]
    assert actual == expected, name


def test_safetensors_package_reads_every_file_loom_wrote(imported):
    name, model, _, ckpt, export, _ = imported
    reference = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        reference.pop("lm_head.weight", None)
    for path in [ckpt / "model-rank00000.safetensors", export / "model.safetensors"]:
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == set(reference), path
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), reference[key]), (path, key)


def test_sharded_bfloat16_export_reads_back(tmp_path):
    kind, config = CONFIGS["llama_gqa_tied_llama3_rope"]
    model = make_hf_model(kind, seed=5, **config)
    model.save_pretrained(tmp_path / "hf")
    run_loom("export", tmp_path / "hf", "--output", tmp_path / "bf16", "--dtype", "bfloat16",
             "--max-shard-size", "60KB")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reference = model.state_dict()
    seen = set()
    for shard in shards:
        with safe_open(str(tmp_path / "bf16" / shard), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.bfloat16
                assert torch.equal(tensor, reference[key].to(torch.bfloat16)), key
                assert index["weight_map"][key] == shard
                seen.add(key)
    assert seen == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(reference[k].numel() * 2 for k in seen)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key


def test_sharded_float32_export_matches_unsharded(tmp_path):
    kind, config = CONFIGS["qwen2_gqa_qkv_bias"]
    model = make_hf_model(kind, seed=6, **config)
    model.save_pretrained(tmp_path / "hf")
    run_loom("export", tmp_path / "hf", "--output", tmp_path / "sharded", "--max-shard-size", "40KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, config["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(7))
    assert (hf_logits(reloaded, ids) - hf_logits(model, ids)).abs().max().item() < TOLERANCE


def test_import_of_a_sharded_transformers_folder(tmp_path):
    kind, config = CONFIGS["llama_mha_untied_3layers_hidden96"]
    model = make_hf_model(kind, seed=8, **config)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    run_loom("import", tmp_path / "hf", "--output", tmp_path / "ckpt")
    ids = torch.randint(0, config["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(9))
    diff = (loom_logits(tmp_path, tmp_path / "ckpt", ids, "x") - hf_logits(model, ids)).abs().max().item()
    assert diff < TOLERANCE


def test_bfloat16_transformers_folder_imports(tmp_path):
    kind, config = CONFIGS["qwen2_gqa_qkv_bias"]
    model = make_hf_model(kind, seed=10, **config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    run_loom("import", tmp_path / "hf", "--output", tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model-rank00000.safetensors"), framework="pt") as f:
        for key in f.keys():
            # Imported into fp32 master weights, exactly the bf16 values.
            assert f.get_tensor(key).dtype == torch.float32
            assert torch.equal(f.get_tensor(key), model.state_dict()[key].float()), key


def test_text_prompt_uses_the_folders_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning God created the heaven and the earth.\n\n" * 20 +
                      "And the earth was without form, and void.\n\n" * 20)
    run_loom("tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--output", tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    # A post-processor that starts every text with a BOS, as Llama's do: the
    # prompt must be encoded with it, as transformers encodes it.
    from tokenizers import processors
    tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer.encode("In").ids[0] == 0
    kind, config = CONFIGS["llama_mha_untied_3layers_hidden96"]
    model = make_hf_model(kind, seed=11, **dict(config, vocab_size=tokenizer.get_vocab_size()))
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    prompt = "In the beginning"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    expected = prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist())
    proc = run_loom("generate", tmp_path / "hf", "--prompt", prompt, "--greedy", "--max-new-tokens", 12)
    assert proc.stdout.rstrip("\n") == expected
    # Imported, the tokenizer travels with the checkpoint.
    run_loom("import", tmp_path / "hf", "--output", tmp_path / "ckpt")
    proc = run_loom("generate", tmp_path / "ckpt", "--prompt", prompt, "--greedy", "--max-new-tokens", 12)
    assert proc.stdout.rstrip("\n") == expected
