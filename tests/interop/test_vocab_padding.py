"""A vocabulary tensor parallelism does not divide (Note [vocab padding] in
parallel/vocab_parallel.h): padded on the tp ranks, invisible elsewhere.

A Hub folder of a tiny Llama with 129 tokens (tp 2 pads it to 130, tp 4 to
132), built by transformers with random weights, is the model.init_from of
4 steps of `loom train` on one rank, on tp 2, tp 4 and dp 2 x tp 2 (tied,
sequence parallel, ZeRO-1). Then:
- every layout logs the single rank's losses within 1e-5 and exports the
  same weights, [129, hidden] (no padding rows);
- the tp 2 export loads in transformers with no missing, unexpected or
  mismatched keys, and its logits are loom's own of the tp 2 checkpoint;
  greedy `loom generate` gives transformers' tokens, all below 129;
- the step-2 checkpoint of tp 1, tp 2 and tp 4 resumes on another tp and
  finishes as the single rank did (within 1e-5), and the dp 2 x tp 2 run
  resumed on its own layout is bit-identical.
"""
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LOOM_BIN, run_loom
from train_cli import run_train

VOCAB = 129
SEQ_LEN = 32
STEPS = 4
SAVED = 2
DATASET_TOOL = os.environ.get("LOOM_DATASET_TOOL", str(LOOM_BIN).replace("/loom", "/tests/loom_dataset_tool"))

# name: (ranks, tied base model, sets)
LAYOUTS = {
    "tp2": (2, False, {"parallel.tp": 2}),
    "tp4": (4, False, {"parallel.tp": 4}),
    "dp2_tp2_sp_zero1": (4, True, {"parallel.tp": 2, "parallel.dp": 2, "parallel.sequence_parallel": "true",
                                   "parallel.zero_stage": 1}),
}


def make_base(folder, tied):
    """A transformers Llama with VOCAB tokens; weights wider than the init's so greedy tokens have clear winners."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5 if tied else 4)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=None,
        eos_token_id=None, pad_token_id=None)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(folder)


def train(tmp, base, name, ranks=1, **sets):
    """STEPS steps of `loom train` from `base`, a checkpoint at step SAVED and the last; returns the run folder."""
    out = tmp / "runs"
    yaml = tmp / f"{name}.yaml"
    # The shape keys again: under mpirun the preflight counts the parameters
    # from them before init_from fills them in.
    yaml.write_text(f"""
run: {{name: {name}, output_dir: {out}, seed: 1, device: cpu}}
model:
  init_from: {base}
  hidden_size: 64
  intermediate_size: 96
  num_layers: 2
  num_heads: 4
  num_kv_heads: 4
  vocab_size: {VOCAB}
data:
  train: [{{path: {tmp / "data"}, weight: 1.0}}]
  seq_len: {SEQ_LEN}
batch: {{micro_batch_size: 1, global_batch_size: 4}}
optimizer: {{lr: 1.0e-3, eps: 1.0e-6}}
schedule: {{train_steps: {STEPS}, warmup_steps: 1}}
checkpoint: {{interval: {SAVED}, resume: auto, export_hf_at_end: true, export_dtype: float32}}
logging: {{interval: 1}}
""")
    run_train(yaml, ranks, sets)
    return out / name


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row and "step" in row}


def assert_losses_close(got, want, steps):
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got, want)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The bases (untied and tied), the dataset, the single-rank runs and every layout's run."""
    tmp = tmp_path_factory.mktemp("vocab-padding")
    bases = {tied: tmp / ("tied" if tied else "untied") for tied in (False, True)}
    for tied, folder in bases.items():
        make_base(folder, tied)
    generator = torch.Generator().manual_seed(11)
    # Ids up to the last token (VOCAB - 1), the one next to the padding.
    documents = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() + [VOCAB - 1] for n in (60, 45, 70, 50)]
    text = "".join(" ".join(map(str, doc)) + "\n" for doc in documents)
    subprocess.run([DATASET_TOOL, "write", str(tmp / "data"), "--vocab-size", str(VOCAB), "--eos", "0"],
                   input=text, text=True, check=True, capture_output=True)
    single = {tied: train(tmp, bases[tied], f"single-{'tied' if tied else 'untied'}") for tied in (False, True)}
    layouts = {name: train(tmp, bases[tied], name, ranks, **sets) for name, (ranks, tied, sets) in LAYOUTS.items()}
    return {"tmp": tmp, "bases": bases, "single": single, "layouts": layouts}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_reproduce_the_single_rank_losses_and_export_no_padding(runs, layout):
    _, tied, _ = LAYOUTS[layout]
    run, single = runs["layouts"][layout], runs["single"][tied]
    assert_losses_close(losses(run), losses(single), range(1, STEPS + 1))
    exported = load_file(str(run / "hf" / "model.safetensors"))
    expected = load_file(str(single / "hf" / "model.safetensors"))
    assert sorted(exported) == sorted(expected)
    assert exported["model.embed_tokens.weight"].shape == (VOCAB, 64)
    assert ("lm_head.weight" in exported) == (not tied)
    for name, tensor in expected.items():
        assert exported[name].shape == tensor.shape, name
        # 1% of one AdamW step (lr 1e-3): tp sums in another order, and a
        # gradient entry near 0 can move its weight by a fraction of lr.
        assert (exported[name] - tensor).abs().max().item() <= 1e-5, name
    # hf/ is exported from the last checkpoint (streamed), so the checkpoint
    # too holds [VOCAB, hidden]: what lets it resume on any tp (below).


def test_the_tp2_export_loads_in_transformers_with_loom_logits(runs):
    from transformers import AutoModelForCausalLM
    run, tmp = runs["layouts"]["tp2"], runs["tmp"]
    reloaded, info = AutoModelForCausalLM.from_pretrained(run / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reloaded.get_input_embeddings().weight.shape == (VOCAB, 64)
    assert reloaded.get_output_embeddings().weight.shape == (VOCAB, 64)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    ids[0, -1] = VOCAB - 1
    save_file({"input_ids": ids.contiguous()}, str(tmp / "ids.safetensors"))
    run_loom("forward", run / "checkpoints" / f"step-{STEPS:07d}", "--input-ids", tmp / "ids.safetensors",
             "--output", tmp / "logits.safetensors")
    loom = load_file(str(tmp / "logits.safetensors"))["logits"]
    assert loom.shape == (2, 24, VOCAB), "logits over the vocabulary, no padding column"
    with torch.no_grad():
        expected = reloaded.eval()(ids).logits.float()
    assert (loom - expected).abs().max().item() < 1e-4


def test_greedy_generation_of_the_padded_run_is_transformers_and_below_the_vocabulary(runs):
    from transformers import AutoModelForCausalLM
    run = runs["layouts"]["tp4"]
    model = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    expected = out[0, prompt.shape[1]:].tolist()
    proc = run_loom("generate", run / "hf", "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--greedy",
                    "--max-new-tokens", 20)
    tokens = [int(t) for t in proc.stdout.strip().split(",")]
    assert tokens == expected
    assert all(0 <= t < VOCAB for t in tokens)


# source layout -> (target ranks, target sets): every tp size resumes another's checkpoint.
RESUMES = {
    "tp1_to_tp2": ("single-untied", 2, {"parallel.tp": 2}),
    "tp2_to_tp4": ("tp2", 4, {"parallel.tp": 4}),
    "tp4_to_tp1": ("tp4", 1, {}),
}


@pytest.mark.parametrize("resume", sorted(RESUMES))
def test_a_checkpoint_resumes_across_tp_sizes(runs, resume):
    source_name, ranks, sets = RESUMES[resume]
    tmp = runs["tmp"]
    source = runs["single"][False] if source_name == "single-untied" else runs["layouts"][source_name]
    run = tmp / "runs" / resume
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / f"step-{SAVED:07d}", run / "checkpoints" / f"step-{SAVED:07d}")
    (run / "checkpoints" / "latest").write_text(f"step-{SAVED:07d}\n")
    train(tmp, runs["bases"][False], resume, ranks, **sets)
    assert_losses_close(losses(run), losses(runs["single"][False]), range(SAVED + 1, STEPS + 1))


def test_the_dp2_tp2_run_resumed_on_its_layout_is_bit_identical(runs):
    ranks, tied, sets = LAYOUTS["dp2_tp2_sp_zero1"]
    tmp, full = runs["tmp"], runs["layouts"]["dp2_tp2_sp_zero1"]
    run = tmp / "runs" / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / f"step-{SAVED:07d}", run / "checkpoints" / f"step-{SAVED:07d}")
    (run / "checkpoints" / "latest").write_text(f"step-{SAVED:07d}\n")
    shutil.copy(full / "metrics.jsonl", run / "metrics.jsonl")
    train(tmp, runs["bases"][tied], "resumed", ranks, **sets)
    assert losses(run) == losses(full)
    assert (run / "hf" / "model.safetensors").read_bytes() == (full / "hf" / "model.safetensors").read_bytes()
