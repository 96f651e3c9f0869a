"""The masked loss of a chat dataset against transformers (docs/fine-tuning.md, "The masked loss").

Conversations are prepared with `loom prepare --chat` and Llama-3.1-Instruct's
real tokenizer and template, so the dataset's /loss_mask covers the assistant
turns only. A tiny Llama with that vocabulary, made by transformers, is the
model.init_from of a one-step run whose global batch is every sample of the
dataset. Step 1's loss (the forward of the initial weights) must equal
transformers' forward of the same rows with labels = -100 where the mask is 0,
summed over the global batch and divided by the number of counted targets
(not a mean of per-row or per-micro-batch means): on 1 rank, on dp2 x 2
micro-batches (each rank counting a different number of targets), and on pp2.
`loss_tokens` in metrics.jsonl is that count.
"""
import itertools
import json
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import LOOM_BIN
from real_tokenizers import LLAMA3_VOCAB, llama3_tokenizer_dir

MPIRUN = shutil.which("mpirun") or "mpirun"
SAMPLES = 8   # the global batch: every sample of the dataset
TOLERANCE = 1e-5

QUESTIONS = ["What is the capital of France?", "2 + 2?", "Name a colour.", "Say hello in Spanish.",
             "How many legs has a spider?", "Spell 'cat' backwards.", "What comes after Monday?"]
ANSWERS = ["Paris.", "4", "Blue, or green, or any other: there are many colours to choose from.", "Hola",
           "Eight legs, like every spider.", "tac", "Tuesday, then Wednesday and the rest of the week."]


def conversations():
    out = []
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 1:  # a second turn, so that some rows hold two assistant spans
            turns += [{"role": "user", "content": "Again, shorter?"}, {"role": "assistant", "content": a[:3]}]
        out.append(turns)
    return out


def read_stream(dataset):
    index = json.loads((dataset / "index.json").read_text())
    tokens, mask = [], []
    for shard in index["shards"]:
        with h5py.File(dataset / shard["file"], "r") as f:
            tokens.append(f["tokens"][:].astype(np.int64))
            mask.append(f["loss_mask"][:].astype(np.int64))
    return np.concatenate(tokens), np.concatenate(mask)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked-loss")
    tokenizer = llama3_tokenizer_dir(tmp / "tokenizer")
    chats = tmp / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations()))
    dataset = tmp / "dataset"
    subprocess.run([str(a) for a in [LOOM_BIN, "prepare", "--chat", "--tokenizer", tokenizer / "tokenizer.json",
                                     "--input", chats, "--output", dataset]], check=True, capture_output=True,
                   timeout=300)
    tokens, mask = read_stream(dataset)
    # seq_len such that the dataset holds exactly SAMPLES samples.
    seq_len = (len(tokens) - 1) // SAMPLES
    assert (len(tokens) - 1) // seq_len == SAMPLES

    config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009)
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits of a useful spread, so that the loss depends on which targets count
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(tmp / "model")
    for f in tokenizer.iterdir():
        shutil.copy2(f, tmp / "model" / f.name)
    return {"tmp": tmp, "dataset": dataset, "model": tmp / "model", "seq_len": seq_len, "tokens": tokens,
            "mask": mask, "hf": model}


def reference(setup):
    """Per sample: (sum of ce over counted targets, count), from transformers."""
    s, tokens, mask = setup["seq_len"], setup["tokens"], setup["mask"]
    rows = np.stack([tokens[j * s: j * s + s + 1] for j in range(SAMPLES)])
    counted = np.stack([mask[j * s + 1: j * s + s + 1] for j in range(SAMPLES)]).astype(bool)
    with torch.no_grad():
        logits = setup["hf"](torch.from_numpy(rows[:, :-1])).logits.double()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), torch.from_numpy(rows[:, 1:]).reshape(-1),
                                           reduction="none").reshape(SAMPLES, s).numpy()
    return [(float(ce[j][counted[j]].sum()), int(counted[j].sum())) for j in range(SAMPLES)]


def train(setup, name, ranks=1, **sets):
    run_sets = {
        "run.output_dir": setup["tmp"] / "runs", "run.name": name, "data.train": f"[{setup['dataset']}]",
        "model.init_from": setup["model"], "data.seq_len": setup["seq_len"], "model.max_seq_len": setup["seq_len"],
        "batch.global_batch_size": SAMPLES, "batch.micro_batch_size": 2, "schedule.train_steps": 1,
        "schedule.warmup_steps": 0, "logging.interval": 1, "checkpoint.interval": 0,
        "checkpoint.export_hf_at_end": "false",
    }
    run_sets.update(sets)
    # No shape keys: model.init_from's config.json gives the shape.
    config = setup["tmp"] / f"{name}.yaml"
    config.write_text("run:\n  device: cpu\n  seed: 7\n")
    args = [LOOM_BIN, "train", config]
    for k, v in run_sets.items():
        args += ["--set", f"{k}={v}"]
    if ranks > 1:
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        args = [MPIRUN, *root, "--oversubscribe", "-np", str(ranks), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (setup["tmp"] / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    [step1] = [r for r in rows if r.get("step") == 1 and "loss" in r and "valid_loss" not in r]
    return step1, result.stdout


@pytest.mark.parametrize("name,ranks,sets", [
    ("one-rank", 1, {}),
    ("dp2", 2, {"parallel.dp": 2}),
    # model.recompute is how to train, not the folder's shape: it holds with model.init_from.
    ("pp2", 2, {"parallel.pp": 2, "model.recompute": "full"}),
])
def test_step_loss_is_the_mean_over_counted_targets_of_the_global_batch(setup, name, ranks, sets):
    per_sample = reference(setup)
    total, count = sum(t for t, _ in per_sample), sum(n for _, n in per_sample)
    step1, log = train(setup, name, ranks, **sets)
    assert f"recompute {sets.get('model.recompute', 'none')}" in log
    assert step1["loss_tokens"] == count
    assert step1["tokens"] == SAMPLES * setup["seq_len"]
    assert abs(step1["loss"] - total / count) < TOLERANCE, (step1["loss"], total / count)
    # The samples count different numbers of targets, so a mean of per-sample
    # means is another number: the test tells the two formulas apart.
    counts = [n for _, n in per_sample]
    assert len(set(counts)) > 2, counts
    # No half of the samples counts half the targets, so whichever four the
    # seeded order gives each dp2 rank, the two ranks count differently.
    assert all(2 * sum(half) != count for half in itertools.combinations(counts, SAMPLES // 2)), counts
    mean_of_means = np.mean([t / n for t, n in per_sample if n > 0])
    assert abs(mean_of_means - total / count) > 1e-3
