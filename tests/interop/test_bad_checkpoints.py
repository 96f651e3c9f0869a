"""Broken model folders are refused with exit code 2 and a message naming the
file and tensor; loom never crashes on them and never leaves output behind.

Each case starts from a folder written by transformers and damages one thing.
"""
import json
import struct

import pytest

from conftest import make_hf_model, run_loom

TENSOR = "model.layers.0.self_attn.k_proj.weight"


def read_parts(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_parts(path, header, data):
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def with_header(change):
    def damage(folder):
        path = folder / "model.safetensors"
        header, data = read_parts(path)
        change(header)
        write_parts(path, header, data)
    return damage


def truncate_data(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])


def header_length_past_end(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])


def overlap(header):
    begin, end = header[TENSOR]["data_offsets"]
    header[TENSOR]["data_offsets"] = [begin - 4, end - 4]


def out_of_range(header):
    begin, end = header[TENSOR]["data_offsets"]
    header[TENSOR]["data_offsets"] = [begin + 10**9, end + 10**9]


def unknown_dtype(header):
    header[TENSOR]["dtype"] = "F24"


def shape_bytes_mismatch(header):
    header[TENSOR]["shape"] = [header[TENSOR]["shape"][0] + 1, header[TENSOR]["shape"][1]]


def missing_tensor(folder):
    from safetensors.torch import load_file, save_file
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[TENSOR]
    save_file(tensors, str(path), metadata={"format": "pt"})


def wrong_shape_for_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4  # the file holds 2 kv heads
    (folder / "config.json").write_text(json.dumps(config))


# (case, damage, fragments the message must contain besides the file name)
CASES = [
    ("truncated_file", truncate_data, []),
    ("header_length_past_end", header_length_past_end, ["header"]),
    ("overlapping_offsets", with_header(overlap), [TENSOR]),
    ("offsets_out_of_range", with_header(out_of_range), [TENSOR]),
    ("unknown_dtype", with_header(unknown_dtype), [TENSOR, "F24"]),
    ("shape_bytes_mismatch", with_header(shape_bytes_mismatch), [TENSOR]),
    ("missing_tensor", missing_tensor, [TENSOR, "missing"]),
    ("wrong_shape_for_config", wrong_shape_for_config, [TENSOR, "shape"]),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pristine") / "hf"
    model = make_hf_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case,damage,fragments", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["import", "export", "inspect", "generate"])
def test_damaged_folder_is_refused_with_exit_code_2(pristine, tmp_path, case, damage, fragments, command):
    import shutil
    folder = tmp_path / "hf"
    shutil.copytree(pristine, folder)
    damage(folder)
    out = tmp_path / "out"
    args = {
        "import": ["import", folder, "--output", out],
        "export": ["export", folder, "--output", out],
        "inspect": ["inspect", folder],
        "generate": ["generate", folder, "--prompt-ids", "1,2", "--max-new-tokens", "2"],
    }[command]
    proc = run_loom(*args, expect=2)
    message = proc.stderr
    assert message.count("\n") == 1, f"expected one line, got: {message!r}"
    assert "error" in message
    assert "model.safetensors" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not out.exists()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_pristine_folder_is_accepted(pristine, tmp_path):
    run_loom("import", pristine, "--output", tmp_path / "ckpt")
    proc = run_loom("inspect", tmp_path / "ckpt")
    assert "loom checkpoint" in proc.stdout and TENSOR in proc.stdout


def test_missing_folder_and_missing_weights_are_named(tmp_path):
    proc = run_loom("import", tmp_path / "nowhere", "--output", tmp_path / "out", expect=2)
    assert "nowhere" in proc.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = run_loom("import", tmp_path / "empty", "--output", tmp_path / "out", expect=2)
    assert "hidden_size" in proc.stderr and "config.json" in proc.stderr


def test_bad_arguments_exit_2(tmp_path):
    assert "unknown command" in run_loom("frobnicate", expect=2).stderr
    assert "--outptu" in run_loom("import", tmp_path, "--outptu", "x", expect=2).stderr
    assert "--prompt-ids" in run_loom("generate", tmp_path, "--prompt-ids", "1,x", expect=2).stderr
