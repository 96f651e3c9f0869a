"""Fine-tuning a Hub folder and exporting it (docs/fine-tuning.md): the export
keeps what the model came with, read back by the real transformers,
huggingface_hub and safetensors.

A tiny Llama-3-style model (2 layers, hidden 32, Llama-3's 128,256-token
vocabulary) is saved by transformers into a Hugging Face cache layout
(models--loom-test--tiny-llama3/snapshots/...) with Llama-3.1-Instruct's
tokenizer folder (tests/interop/real_tokenizers.py: tokenizer.json,
tokenizer_config.json, chat_template.jinja), a generation_config.json with
Llama-3.1's eos list and sampling defaults, and a model card with a license.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import LOOM_BIN
from real_tokenizers import llama3_tokenizer_dir  # Llama-3.1-Instruct's tokenizer folder, from llama.cpp's vocabulary

REPO = Path(__file__).resolve().parents[2]
MPIRUN = shutil.which("mpirun") or "mpirun"
BASE_ID = "loom-test/tiny-llama3"
EOS_LIST = [128001, 128008, 128009]
CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]
STRINGS = ["Hello world", "In the beginning God created the heaven and the earth.", "  spaces\tand\nlines 12345",
           "<|eot_id|> special and ünïcödé"]

def loom(*args, expect=0, np_=1, timeout=300):
    command = [LOOM_BIN, *map(str, args)]
    if np_ > 1:
        command = [MPIRUN, "--oversubscribe", "-np", str(np_), *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
                   *command]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == expect, (f"{' '.join(command)} exited {proc.returncode}, expected {expect}\n"
                                       f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}")
    return proc


def train_args(out, name, init_from, dataset, steps=3, **extra):
    """`loom train` from `init_from`, whose config.json gives the model's shape."""
    config = Path(out) / "fine-tune.yaml"
    Path(out).mkdir(parents=True, exist_ok=True)
    config.write_text("run:\n  device: cpu\n")
    sets = {"run.output_dir": out, "run.name": name, "model.init_from": init_from, "data.train": f"[{dataset}]",
            "data.seq_len": 32, "batch.global_batch_size": 4, "batch.micro_batch_size": 2,
            "schedule.train_steps": steps, "schedule.warmup_steps": 1, "checkpoint.interval": 0,
            "checkpoint.export_dtype": "float32", "logging.interval": 1}
    sets.update(extra)
    args = ["train", config]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def save_base_model(folder, tokenizer_dir):
    """The tiny model, its tokenizer folder, generation_config.json and a card, as a Hub folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eot, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": EOS_LIST, "do_sample": True, "temperature": 0.6,
        "top_p": 0.9, "transformers_version": "4.45.0"}, indent=2) + "\n")
    (folder / "README.md").write_text("---\nlicense: llama3.1\nlanguage:\n  - en\n---\n\n# tiny llama3\n")
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base model in a Hugging Face cache layout, and a dataset prepared with its tokenizer."""
    root = tmp_path_factory.mktemp("fine-tune")
    tokenizer_dir = llama3_tokenizer_dir(root / "llama3-tokenizer")
    folder = root / "hub" / "models--loom-test--tiny-llama3" / "snapshots" / "0123456789abcdef"
    folder.mkdir(parents=True)
    save_base_model(folder, tokenizer_dir)
    corpus = root / "corpus.txt"
    subprocess.run(["bash", str(REPO / "data" / "corpus" / "make_kjv.sh"), str(corpus)], check=True,
                   capture_output=True)
    corpus.write_text("\n".join(corpus.read_text().splitlines()[:400]) + "\n")
    loom("prepare", "--tokenizer", folder / "tokenizer.json", "--input", corpus, "--output", root / "ds")
    # Conversations, rendered with the base model's own chat template: what
    # the fine-tune below trains on.
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
        {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n" for i in range(12)))
    loom("prepare", "--chat", "--tokenizer", folder / "tokenizer.json", "--input", chats, "--output", root / "chat")
    return {"root": root, "folder": folder, "dataset": root / "ds", "chat": root / "chat", "corpus": corpus}


@pytest.fixture(scope="module")
def run(base):
    """3 steps on the chat dataset (loss mask, packed conversations masked
    apart) from a copy of the base folder, which is then moved away: the
    checkpoint must have kept what the export needs."""
    copy = base["root"] / "copy" / "models--loom-test--tiny-llama3" / "snapshots" / "0123456789abcdef"
    shutil.copytree(base["folder"], copy)
    out = base["root"] / "runs"
    loom(*train_args(out, "ft", copy, base["chat"], **{"data.document_mask": "true"}))
    shutil.move(base["root"] / "copy", base["root"] / "moved")
    return out / "ft"


def test_export_keeps_tokenizer_chat_template_and_generation_config(base, run):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    hf = run / "hf"
    assert (base["folder"] / "chat_template.jinja").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        if (base["folder"] / name).exists():
            assert (hf / name).read_bytes() == (base["folder"] / name).read_bytes(), name
    source, exported = AutoTokenizer.from_pretrained(str(base["folder"])), AutoTokenizer.from_pretrained(str(hf))
    for text in STRINGS:
        assert exported(text).input_ids == source(text).input_ids, text
    assert exported.chat_template == source.chat_template and exported.chat_template
    rendered = exported.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert rendered == source.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    generation = GenerationConfig.from_pretrained(str(hf))
    assert generation.eos_token_id == EOS_LIST
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.6, 0.9)
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert model.config.vocab_size == len(source)
    assert model.generation_config.eos_token_id == EOS_LIST


def test_the_fine_tune_trained_on_the_assistant_turns_only(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss_tokens" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        # 4 rows of 32 tokens: the prompts, headers and document starts leave the loss.
        assert 0 < r["loss_tokens"] < 4 * 32, r


def test_model_card_metadata_names_the_base_model(run):
    from huggingface_hub import ModelCard
    card = ModelCard.load(str(run / "hf" / "README.md"))
    assert card.data.base_model == BASE_ID
    assert card.data.library_name == "transformers"
    assert card.data.license == "llama3.1"
    assert "loom" in card.data.tags


def test_loom_export_of_the_checkpoint_after_the_base_folder_moved(base, run, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer, GenerationConfig
    checkpoint = run / "checkpoints" / "step-0000003"
    assert not (base["root"] / "copy").exists()
    loom("export", checkpoint, "--output", tmp_path / "hf")
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (base["folder"] / name).read_bytes(), name
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == EOS_LIST
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).chat_template
    assert ModelCard.load(str(tmp_path / "hf" / "README.md")).data.base_model == BASE_ID


def other_tokenizer_dataset(base):
    """A dataset prepared with another tokenizer (loom's own BPE trained on the corpus)."""
    folder = base["root"] / "other"
    if not (folder / "ds" / "index.json").exists():
        folder.mkdir(exist_ok=True)
        loom("tokenizer", "train", "--input", base["corpus"], "--vocab-size", 300, "--output", folder / "tok.json")
        loom("prepare", "--tokenizer", folder / "tok.json", "--input", base["corpus"], "--output", folder / "ds")
    return folder / "ds"


def test_dataset_of_another_tokenizer_is_refused_naming_both_hashes(base, tmp_path):
    other = other_tokenizer_dataset(base)
    other_hash = json.loads((other / "index.json").read_text())["tokenizer_hash"]
    model_hash = json.loads((base["dataset"] / "index.json").read_text())["tokenizer_hash"]
    assert other_hash != model_hash
    proc = loom(*train_args(tmp_path, "refused", base["folder"], other, steps=1), expect=2)
    assert other_hash in proc.stderr and model_hash in proc.stderr, proc.stderr
    assert str(base["folder"] / "tokenizer.json") in proc.stderr and "allow_tokenizer_mismatch" in proc.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    proc = loom(*train_args(tmp_path, "allowed", base["folder"], other, steps=1,
                            **{"data.allow_tokenizer_mismatch": "true", "checkpoint.enabled": "false",
                               "checkpoint.export_hf_at_end": "false"}))
    assert "warning" in proc.stderr and other_hash in proc.stderr


@pytest.fixture(scope="module")
def added_tokens(base):
    """A fine-tune's tokenizer: the base one plus two special tokens, saved by
    transformers into its own folder; the corpus prepared with it."""
    from transformers import AutoTokenizer
    folder = base["root"] / "added-tokens"
    tokenizer = AutoTokenizer.from_pretrained(str(base["folder"]))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool_call|>", "<|tool_result|>"]})
    tokenizer.save_pretrained(str(folder))
    loom("prepare", "--tokenizer", folder / "tokenizer.json", "--input", base["corpus"], "--output",
         base["root"] / "ds-added")
    grown = len(tokenizer) + len(tokenizer) % 2  # tp 2 splits the rows
    return {"folder": folder, "dataset": base["root"] / "ds-added", "size": len(tokenizer), "grown": grown}


def resized_export(base, added_tokens, out, name, np_=1, **extra):
    # lr 1e-30 moves no fp32 weight (far below half an ulp of any of them): the
    # exported weights are the loaded ones, so rows compare exactly.
    loom(*train_args(out, name, base["folder"], added_tokens["dataset"], steps=1,
                     **{"data.tokenizer": added_tokens["folder"] / "tokenizer.json",
                        "model.resize_vocab": added_tokens["grown"], "optimizer.lr": 1e-30,
                        "checkpoint.enabled": "false", **extra}), np_=np_)
    return out / name / "hf"


def test_resize_vocab_grows_rows_to_the_mean_and_the_export_loads(base, added_tokens, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = resized_export(base, added_tokens, tmp_path, "grown")
    source = load_file(str(base["folder"] / "model.safetensors"))
    exported = load_file(str(hf / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = source[name]
        assert exported[name].shape == (added_tokens["grown"], old.shape[1])
        np.testing.assert_array_equal(exported[name][:old.shape[0]], old)
        mean = old.astype(np.float64).mean(axis=0).astype(np.float32)
        for row in exported[name][old.shape[0]:]:
            np.testing.assert_allclose(row, mean, rtol=1e-6, atol=1e-7)
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == added_tokens["grown"]
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    assert len(tokenizer) == added_tokens["size"] and tokenizer.convert_tokens_to_ids("<|tool_result|>") >= len(old)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    assert model.get_input_embeddings().weight.shape[0] == added_tokens["grown"]


def test_resize_vocab_on_tp2_matches_one_rank(base, added_tokens, tmp_path):
    from safetensors.numpy import load_file
    one = load_file(str(resized_export(base, added_tokens, tmp_path, "one") / "model.safetensors"))
    tp2 = load_file(str(resized_export(base, added_tokens, tmp_path, "tp2", np_=2, **{"parallel.tp": 2})
                        / "model.safetensors"))
    assert one.keys() == tp2.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], tp2[name], err_msg=name)


def test_resize_vocab_below_the_source_or_without_init_from_is_refused(base, tmp_path):
    vocab = json.loads((base["folder"] / "config.json").read_text())["vocab_size"]
    proc = loom(*train_args(tmp_path, "shrink", base["folder"], base["dataset"], steps=1,
                            **{"model.resize_vocab": vocab - 2}), expect=2)
    assert "model.resize_vocab" in proc.stderr and str(vocab) in proc.stderr
    shape = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 4,
             "model.vocab_size": vocab, "model.max_seq_len": 64}
    proc = loom(*train_args(tmp_path, "scratch", "", base["dataset"], steps=1,
                            **{"model.resize_vocab": vocab + 2, **shape}), expect=2)
    assert "model.resize_vocab" in proc.stderr and "model.init_from" in proc.stderr
