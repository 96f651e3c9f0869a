"""What the family interop tests share (test_model_families.py,
test_moe_families.py): a tiny Hub model built by the real transformers from
a family's config, its tokens as a loom dataset, `loom train` from it, and
the checks every family passes against transformers.

A family table maps a family's name to (config class, model class, config
keyword arguments), both classes named as transformers exports them.
"""
import json
import os
import subprocess

import torch
from safetensors.torch import load_file, save_file

from conftest import LOOM_BIN, run_loom
from train_cli import run_train

TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5
VOCAB = 128
SEQ_LEN = 32
DATASET_TOOL = os.environ.get("LOOM_DATASET_TOOL", str(LOOM_BIN).replace("/loom", "/tests/loom_dataset_tool"))


def make_model(families, family, seed):
    """The family's transformers model with random weights: norm weights
    around 1 (not exactly 1), biases and other weights wider than the init's
    0.02, so that every norm, bias and router changes the logits and greedy
    decoding has clear winners."""
    import transformers
    config_name, model_name, config = families[family]
    config = dict(config, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def make_family(families, family, tmp_path_factory):
    """The model saved as tmp/hf and four random documents as the dataset
    tmp/data; returns (model, tmp)."""
    tmp = tmp_path_factory.mktemp(family)
    model = make_model(families, family, seed=len(family))
    model.save_pretrained(tmp / "hf")
    generator = torch.Generator().manual_seed(11)
    documents = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in (40, 35, 50, 30)]
    text = "".join(" ".join(map(str, doc)) + "\n" for doc in documents)
    subprocess.run([DATASET_TOOL, "write", str(tmp / "data"), "--vocab-size", str(VOCAB), "--eos", "0"],
                   input=text, text=True, check=True, capture_output=True)
    return model, tmp


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def loom_logits(folder, ids, path):
    save_file({"input_ids": ids.contiguous()}, str(path.with_suffix(".ids.safetensors")))
    run_loom("forward", folder, "--input-ids", path.with_suffix(".ids.safetensors"), "--output", path)
    return load_file(str(path))["logits"]


def train(tmp, config, architecture, name, ranks=1, model_lines="", expected_steps=3, **sets):
    """3 steps of `loom train` from tmp/hf (`config`: the family's keyword
    arguments) on `ranks` ranks, with `sets` as --set overrides; returns the
    run folder and the training steps' metrics rows."""
    out = tmp / "runs"
    yaml = tmp / f"{name}.yaml"
    # The shape keys again (checked against config.json): under mpirun the
    # preflight counts the parameters from them before init_from fills them in.
    yaml.write_text(f"""
run: {{name: {name}, output_dir: {out}, seed: 1, device: cpu}}
model:
  init_from: {tmp / "hf"}
  architecture: {architecture}
  hidden_size: {config["hidden_size"]}
  intermediate_size: {config["intermediate_size"]}
  num_layers: {config["num_hidden_layers"]}
  num_heads: {config["num_attention_heads"]}
  num_kv_heads: {config["num_key_value_heads"]}
  vocab_size: {VOCAB}
{model_lines}data:
  train: [{{path: {tmp / "data"}, weight: 1.0}}]
  seq_len: {SEQ_LEN}
batch: {{micro_batch_size: 1, global_batch_size: 4}}
optimizer: {{lr: 1.0e-3}}
schedule: {{train_steps: 3, warmup_steps: 1}}
checkpoint: {{interval: 0, export_hf_at_end: {"true" if ranks == 1 else "false"}, export_dtype: float32}}
logging: {{interval: 1}}
""")
    run_train(yaml, ranks, sets)
    steps = metrics_rows(out / name)
    assert len(steps) == expected_steps, steps
    return out / name, steps


def metrics_rows(run):
    """The training steps' rows of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if "loss" in row and "step" in row]


def check_logits(name, model, tmp):
    """loom's logits on tmp/hf are transformers' within TOLERANCE."""
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    diff = (loom_logits(tmp / "hf", ids, tmp / "hf-logits.safetensors") - hf_logits(model, ids)).abs().max().item()
    assert diff < TOLERANCE, f"{name}: max |loom - transformers| = {diff}"


def check_greedy_generation(name, model, tmp):
    """20 greedy tokens of `loom generate` after a 20-token prompt are transformers' own."""
    prompt = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    expected = out[0, prompt.shape[1]:].tolist()
    proc = run_loom("generate", tmp / "hf", "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
                    "--greedy", "--max-new-tokens", 20)
    assert [int(t) for t in proc.stdout.strip().split(",")] == expected, name


def check_trained_export(name, model, tmp, run, losses):
    """The run's losses fell; its export loads in transformers as the same
    class with no missing, unexpected or mismatched key, and its logits are
    loom's own of the run's last checkpoint, away from the base model's.
    Returns the reloaded model."""
    from transformers import AutoModelForCausalLM
    assert all(loss == loss for loss in losses) and losses[-1] < losses[0], losses
    reloaded, info = AutoModelForCausalLM.from_pretrained(run / "hf", output_loading_info=True)
    assert type(reloaded).__name__ == type(model).__name__
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["model_type"] == model.config.model_type
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    trained = loom_logits(run / "checkpoints" / "step-0000003", ids, tmp / "trained-logits.safetensors")
    expected = hf_logits(reloaded.eval(), ids)
    assert (trained - expected).abs().max().item() < TOLERANCE, name
    # Training moved the weights: the export is not the base model.
    assert (expected - hf_logits(model, ids)).abs().max().item() > 1e-3
    return reloaded
