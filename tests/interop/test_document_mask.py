"""data.document_mask: packed documents attend only within themselves.

transformers runs each document alone; loom runs them packed into one
sequence with per-token positions (0 at each document start):
- `loom forward --positions` gives, at every position, the logits of the
  document's own run (and so its per-token losses) within 1e-5 in fp32, also
  for a row that starts in the middle of a document (transformers given that
  document's position_ids);
- one step of `loom train` with data.document_mask on a dataset of chosen
  documents, on 1 rank, tp 2 (with and without sequence parallelism),
  pp 2 (two micro-batches through the 1f1b schedule), cp 2, cp 4 (ring
  attention over zig-zag chunks) and cp 2 x pp 2, logs as its loss
  the mean of transformers' per-document next-token losses over the targets
  that stay inside a document (a target that starts the next document leaves
  the loss) within 1e-5; without the mask the loss is transformers' mean over
  the packed sequence, which differs.
The step's logged loss is the forward's, before the update.
"""
import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import LOOM_BIN, make_hf_model, run_loom
from train_cli import run_train

TOLERANCE = 1e-5
SEQ_LEN = 32
VOCAB = 128
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# Training data: 65 tokens = two samples of SEQ_LEN + 1 that share token 32,
# where a document starts, so each row holds whole documents (the last one of
# a row runs into the next row only as the shared token).
TRAIN_DOCUMENTS = [9, 14, 9, 20, 13]
DATASET_TOOL = os.environ.get("LOOM_DATASET_TOOL", str(LOOM_BIN).replace("/loom", "/tests/loom_dataset_tool"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A transformers Llama (GQA 4:2, two layers, fp32) and its Hub folder."""
    tmp = tmp_path_factory.mktemp("document_mask")
    model = make_hf_model("llama", seed=3, **HF_CONFIG)
    model.save_pretrained(tmp / "hf")
    return model, tmp / "hf", tmp


def hf_logits(model, ids, first_position=0):
    """transformers' logits [T, V] of one document alone (fp32)."""
    with torch.no_grad():
        positions = torch.arange(first_position, first_position + len(ids)).unsqueeze(0)
        return model(torch.tensor([ids]), position_ids=positions).logits[0].float()


def token_losses(logits, ids):
    """Next-token cross-entropy of each target inside `ids`: [len(ids) - 1], float64."""
    return F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="none")


def test_packed_forward_gives_each_documents_own_logits(model_dir):
    model, hf_dir, tmp = model_dir
    generator = torch.Generator().manual_seed(5)
    # Row 0: four documents of different lengths. Row 1: the last 6 tokens of
    # a document that began earlier (positions 5..10), then two documents.
    segments = [[(7, 0), (12, 0), (3, 0), (10, 0)], [(6, 5), (14, 0), (12, 0)]]
    ids, positions, pieces = [], [], []
    for row, row_segments in enumerate(segments):
        row_ids, row_positions, start = [], [], 0
        for length, first in row_segments:
            doc = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
            pieces.append((row, start, doc, first))
            row_ids += doc
            row_positions += list(range(first, first + length))
            start += length
        ids.append(row_ids)
        positions.append(row_positions)
    ids, positions = torch.tensor(ids), torch.tensor(positions)
    assert ids.shape == (2, 32)
    save_file({"input_ids": ids}, str(tmp / "ids.safetensors"))
    save_file({"positions": positions}, str(tmp / "positions.safetensors"))
    run_loom("forward", hf_dir, "--input-ids", tmp / "ids.safetensors", "--positions", tmp / "positions.safetensors",
             "--output", tmp / "packed.safetensors")
    run_loom("forward", hf_dir, "--input-ids", tmp / "ids.safetensors", "--output", tmp / "unmasked.safetensors")
    packed = load_file(str(tmp / "packed.safetensors"))["logits"]
    unmasked = load_file(str(tmp / "unmasked.safetensors"))["logits"]

    for row, start, doc, first in pieces:
        expected = hf_logits(model, doc, first)
        got = packed[row, start:start + len(doc)]
        diff = (got - expected).abs().max().item()
        assert diff < TOLERANCE, f"row {row}, document at {start}: max |loom - transformers| = {diff}"
        loss_diff = (token_losses(got, doc) - token_losses(expected, doc)).abs().max().item()
        assert loss_diff < TOLERANCE, f"row {row}, document at {start}: per-token losses differ by {loss_diff}"
    # Without positions the later documents attend to the earlier ones.
    assert (unmasked[0, 7:] - packed[0, 7:]).abs().max().item() > 1e-3


def test_forward_refuses_positions_of_another_shape(model_dir):
    _, hf_dir, tmp = model_dir
    save_file({"input_ids": torch.zeros(1, 8, dtype=torch.long)}, str(tmp / "ids8.safetensors"))
    save_file({"positions": torch.arange(7).unsqueeze(0)}, str(tmp / "positions7.safetensors"))
    proc = run_loom("forward", hf_dir, "--input-ids", tmp / "ids8.safetensors", "--positions",
                    tmp / "positions7.safetensors", "--output", tmp / "out.safetensors", expect=2)
    assert "positions" in proc.stderr and "[1, 7]" in proc.stderr, proc.stderr


# --- one training step ----------------------------------------------------------------

@pytest.fixture(scope="module")
def train_data(model_dir):
    """The dataset of TRAIN_DOCUMENTS (random ids) and its documents' ids."""
    _, _, tmp = model_dir
    generator = torch.Generator().manual_seed(11)
    documents = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in TRAIN_DOCUMENTS]
    text = "".join(" ".join(map(str, doc)) + "\n" for doc in documents)
    subprocess.run([DATASET_TOOL, "write", str(tmp / "data"), "--vocab-size", str(VOCAB), "--eos", "0"],
                   input=text, text=True, check=True, capture_output=True)
    return tmp / "data", documents


def write_config(path, hf_dir, data_dir, output_dir):
    path.write_text(f"""
run: {{name: step, output_dir: {output_dir}, seed: 1, device: cpu}}
model:
  init_from: {hf_dir}
  # The shape again (checked against config.json): under mpirun the
  # preflight counts the parameters from these keys before init_from fills
  # them in.
  hidden_size: {HF_CONFIG["hidden_size"]}
  intermediate_size: {HF_CONFIG["intermediate_size"]}
  num_layers: {HF_CONFIG["num_hidden_layers"]}
  num_heads: {HF_CONFIG["num_attention_heads"]}
  num_kv_heads: {HF_CONFIG["num_key_value_heads"]}
  vocab_size: {VOCAB}
data:
  train: [{{path: {data_dir}, weight: 1.0}}]
  seq_len: {SEQ_LEN}
batch: {{micro_batch_size: 1, global_batch_size: 2}}
optimizer: {{lr: 1.0e-3}}
schedule: {{train_steps: 1, warmup_steps: 0}}
checkpoint: {{interval: 0, export_hf_at_end: false}}
logging: {{interval: 1}}
""")
    return path


def step_one(model_dir, train_data, name, ranks=1, **sets):
    """Runs one step of `loom train` and returns its metrics row."""
    _, hf_dir, tmp = model_dir
    out = tmp / name
    config = write_config(tmp / f"{name}.yaml", hf_dir, train_data[0], out)
    run_train(config, ranks, sets)
    rows = [json.loads(line) for line in (out / "step" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(row for row in rows if row.get("step") == 1)


def expected_losses(model, documents):
    """(masked, unmasked) step-1 losses from transformers: the mean over every
    document's own next-token losses, and the mean over both packed rows."""
    within = torch.cat([token_losses(hf_logits(model, doc), doc) for doc in documents])
    stream = [token for doc in documents for token in doc]
    rows = [stream[0:SEQ_LEN + 1], stream[SEQ_LEN:2 * SEQ_LEN + 1]]
    packed = torch.cat([token_losses(hf_logits(model, row), row) for row in rows])
    return within.mean().item(), len(within), packed.mean().item()


LAYOUTS = {
    "single": (1, {}),
    "tp2": (2, {"parallel.tp": 2}),
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    "pp2": (2, {"parallel.pp": 2}),
    # Context parallelism: each rank holds 2 of 2 cp chunks of 32 / (2 cp)
    # tokens; documents cross the chunks, and the ring masks them.
    "cp2": (2, {"parallel.cp": 2}),
    "cp4": (4, {"parallel.cp": 4}),
    "cp2-pp2": (4, {"parallel.cp": 2, "parallel.pp": 2}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_loss_is_transformers_mean_over_each_documents_own_targets(model_dir, train_data, layout):
    model, _, _ = model_dir
    masked, counted, _ = expected_losses(model, train_data[1])
    ranks, sets = LAYOUTS[layout]
    row = step_one(model_dir, train_data, f"masked-{layout}", ranks, **sets, **{"data.document_mask": "true"})
    assert row.get("loss_tokens") == counted == sum(n - 1 for n in TRAIN_DOCUMENTS), row
    assert abs(row["loss"] - masked) < TOLERANCE, f"{layout}: loom {row['loss']}, transformers {masked}"


def test_without_the_mask_the_loss_is_the_packed_sequences(model_dir, train_data):
    model, _, _ = model_dir
    masked, _, unmasked = expected_losses(model, train_data[1])
    row = step_one(model_dir, train_data, "unmasked", 1)
    assert abs(row["loss"] - unmasked) < TOLERANCE, f"loom {row['loss']}, transformers {unmasked}"
    assert abs(unmasked - masked) > 1e-3
