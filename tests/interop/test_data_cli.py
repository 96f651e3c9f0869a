"""The data commands of the `loom` binary, from outside: `loom tokenizer
train`, `loom prepare` and `loom inspect` (docs/data.md, "Commands").

A good dataset is accepted and decodes to the corpus; every kind of bad input
(damaged shards, an index.json that disagrees with them, unsupported or
missing tokenizers and inputs) exits with code 2 and one stderr line naming
the offending file, never with a crash; a failed or interrupted prepare never
leaves a folder that looks like a dataset; and the dataset depends neither on
the input format (text or JSONL) nor on the thread count.

The fixtures come from the King James Bible (data/corpus/make_kjv.sh, which
needs the `bible` program of Debian's bible-kjv package): a tokenizer of 512
entries trained on its first ~200 KB, and a dataset of those documents in
shards of at most 20,000 tokens.
"""
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import LOOM_BIN, record_shard_file, run_loom

ROOT = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 512
SHARD_TOKENS = 20000
EOS = "<|endoftext|>"


# ---------------------------------------------------------------- fixtures

def documents_of(text):
    """The documents of a plain-text input: its blank-line-separated blocks."""
    return [block for block in text.split("\n\n") if block.strip()]


def write_documents(path, documents):
    path.write_text("\n\n".join(documents) + "\n")
    return path


def first_documents(documents, size):
    """The leading documents of `documents` that together hold about `size` characters."""
    taken, total = [], 0
    for document in documents:
        if total >= size:
            break
        taken.append(document)
        total += len(document) + 2
    return taken


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cli")


@pytest.fixture(scope="module")
def corpus(work):
    if shutil.which("bible") is None:
        pytest.fail("the `bible` program is missing: apt-get install bible-kjv (make_kjv.sh reads it)")
    path = work / "kjv.txt"
    subprocess.run([str(ROOT / "data" / "corpus" / "make_kjv.sh"), str(path)], check=True, timeout=120)
    text = path.read_text()
    assert len(documents_of(text)) == 1189
    return path


@pytest.fixture(scope="module")
def corpus_documents(corpus):
    return documents_of(corpus.read_text())


@pytest.fixture(scope="module")
def small_documents(corpus_documents):
    return first_documents(corpus_documents, 200_000)


@pytest.fixture(scope="module")
def small_input(work, small_documents):
    return write_documents(work / "small.txt", small_documents)


@pytest.fixture(scope="module")
def tokenizer(work, small_input):
    path = work / "tokenizer.json"
    run_loom("tokenizer", "train", "--input", small_input, "--vocab-size", VOCAB_SIZE, "--output", path)
    assert Tokenizer.from_file(str(path)).get_vocab_size() == VOCAB_SIZE
    return path


@pytest.fixture(scope="module")
def dataset(work, tokenizer, small_input):
    folder = work / "dataset"
    run_loom("prepare", "--tokenizer", tokenizer, "--input", small_input, "--output", folder,
             "--shard-tokens", SHARD_TOKENS)
    index = read_index(folder)
    assert len(index["shards"]) >= 3, index
    return folder


@pytest.fixture
def copy(dataset, tmp_path):
    """A fresh copy of the good dataset, for a test to damage."""
    folder = tmp_path / "dataset"
    shutil.copytree(dataset, folder)
    return folder


def read_index(folder):
    return json.loads((folder / "index.json").read_text())


def write_index(folder, index):
    (folder / "index.json").write_text(json.dumps(index, indent=2))


def shard_arrays(folder):
    """(tokens, doc_offsets) of every shard, in index order."""
    arrays = []
    for shard in read_index(folder)["shards"]:
        with h5py.File(folder / shard["file"], "r") as f:
            arrays.append((f["tokens"][:], f["doc_offsets"][:]))
    return arrays


def all_tokens(folder):
    return np.concatenate([tokens for tokens, _ in shard_arrays(folder)])


def assert_refused(command, *args, names=(), fragments=()):
    """Runs `loom COMMAND ARGS...`; asserts exit code 2 (not a signal) and a
    single stderr line `loom COMMAND: error: ...` that contains every name and
    fragment (fragments case-insensitively). Returns the message."""
    proc = run_loom(command, *args, expect=2)
    message = proc.stderr
    problems = []
    if message.count("\n") != 1 or not message.endswith("\n"):
        problems.append("not exactly one line")
    if not message.startswith(f"loom {command}: error: "):
        problems.append(f"does not start with 'loom {command}: error: '")
    if message.count(f"loom {command}:") != 1:
        problems.append(f"'loom {command}:' repeated")
    problems += [f"does not name {str(name)!r}" for name in names if str(name) not in message]
    problems += [f"lacks {fragment!r}" for fragment in fragments if fragment.lower() not in message.lower()]
    assert not problems, f"loom {command} stderr {message!r}: " + "; ".join(problems)
    return message


def assert_not_a_dataset(folder):
    """What a failed prepare may leave: no index.json and no shard files."""
    assert not (folder / "index.json").exists()
    if folder.exists():
        assert not [p.name for p in folder.iterdir() if p.name.startswith("shard-")]


# ---------------------------------------------------------------- a good dataset

def test_good_dataset_is_verified_lists_every_shard_and_decodes_corpus_text(dataset, tokenizer, corpus):
    proc = run_loom("inspect", dataset, "--verify", "--tokenizer", tokenizer)
    index = read_index(dataset)
    for shard in index["shards"]:
        assert shard["file"] in proc.stdout, proc.stdout
    assert str(index["num_tokens"]) in proc.stdout

    # The first token ids shown are the dataset's first tokens, and the text
    # shown is their decoding: text of the corpus, as `tokenizers` decodes it.
    assert "first tokens: " in proc.stdout and "decoded: " in proc.stdout, proc.stdout
    ids_line = proc.stdout.split("first tokens: ", 1)[1].split("\n", 1)[0]
    ids = [int(x) for x in ids_line.split()]
    assert len(ids) >= 10
    np.testing.assert_array_equal(all_tokens(dataset)[:len(ids)], ids)
    decoded = proc.stdout.split("decoded: ", 1)[1].rstrip("\n")
    assert len(decoded) >= 40
    assert decoded in corpus.read_text()
    reference = Tokenizer.from_file(str(tokenizer)).decode(ids, skip_special_tokens=False)
    assert decoded == reference.rstrip("\n")


def test_prepare_writes_every_document_encoded_and_followed_by_eos(dataset, tokenizer, small_documents):
    reference = Tokenizer.from_file(str(tokenizer))
    eos = reference.token_to_id(EOS)
    index = read_index(dataset)
    assert index["vocab_size"] == VOCAB_SIZE and index["eos_id"] == eos and index["token_dtype"] == "uint16"
    assert index["num_documents"] == len(small_documents)

    documents = []
    for shard, (tokens, offsets) in zip(index["shards"], shard_arrays(dataset)):
        assert tokens.dtype == np.uint16
        assert shard["num_tokens"] == len(tokens) <= SHARD_TOKENS
        assert shard["num_documents"] == len(offsets) - 1
        assert offsets[0] == 0 and offsets[-1] == len(tokens)
        documents += [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    assert index["num_tokens"] == sum(len(d) for d in documents)
    for text, ids in zip(small_documents, documents, strict=True):
        assert ids == reference.encode(text, add_special_tokens=False).ids + [eos]


# ---------------------------------------------------------------- damaged datasets

def delete_shard(folder):
    (folder / "shard-00002.h5").unlink()


def truncate_shard(folder):
    path = folder / "shard-00002.h5"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def recorded(damage):
    """`damage`, then index.json made to agree with the shard's size and whole-file CRC-32C,
    so that the change gets past the check before HDF5 and loom's later checks must find it."""
    def damage_and_record(folder):
        damage(folder)
        index = read_index(folder)
        record_shard_file(index, 2, folder / "shard-00002.h5")
        write_index(folder, index)
    return damage_and_record


def flip_byte(offset):
    def damage(folder):
        path = folder / "shard-00002.h5"
        data = bytearray(path.read_bytes())
        data[offset % len(data)] ^= 0x40
        path.write_bytes(bytes(data))
    return damage


def garbage_shard(folder):
    path = folder / "shard-00002.h5"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def with_h5(change):
    def damage(folder):
        size = (folder / "shard-00002.h5").stat().st_size
        with h5py.File(folder / "shard-00002.h5", "r+") as f:
            change(f)
        assert (folder / "shard-00002.h5").stat().st_size == size, "h5py changed the file size"
    return damage


def token_out_of_vocab(value):
    def change(f):
        f["tokens"][100] = value
    return change


def decreasing_offsets(f):
    offsets = f["doc_offsets"]
    offsets[2] = offsets[3] + 1


def with_index(change):
    def damage(folder):
        index = read_index(folder)
        change(index)
        write_index(folder, index)
    return damage


def shard_tokens_plus_one(index):
    index["shards"][2]["num_tokens"] += 1
    index["num_tokens"] += 1


def shard_tokens_plus_one_total_unchanged(index):
    index["shards"][2]["num_tokens"] += 1


def shard_documents_minus_one(index):
    index["shards"][2]["num_documents"] -= 1
    index["num_documents"] -= 1


def set_key(key, value):
    def change(index):
        index[key] = value
    return change


def set_shard_key(key, value):
    def change(index):
        index["shards"][2][key] = value
    return change


def malformed(text):
    def damage(folder):
        (folder / "index.json").write_text(text)
    return damage


def cut_index(folder):
    path = folder / "index.json"
    path.write_text(path.read_text()[:len(path.read_text()) // 2])


SHARD = "shard-00002.h5"
INDEX = "index.json"

# (case, damage, file the message names, fragments it must contain)
DAMAGES = [
    ("shard_deleted", delete_shard, SHARD, ["missing"]),
    ("shard_truncated", truncate_shard, SHARD, ["bytes"]),
    ("shard_byte_flipped_in_hdf5_header", flip_byte(200), SHARD, ["file CRC32C", "not opened"]),
    ("shard_byte_flipped_at_end", flip_byte(-1), SHARD, ["file CRC32C", "not opened"]),
    ("shard_changed_by_h5py", with_h5(token_out_of_vocab(1)), SHARD, ["file CRC32C", "not opened"]),
    ("shard_replaced_by_garbage", garbage_shard, SHARD, ["file CRC32C"]),
    ("shard_truncated_with_matching_index", recorded(truncate_shard), SHARD, ["HDF5"]),
    ("shard_garbage_with_matching_index", recorded(garbage_shard), SHARD, ["HDF5"]),
    ("token_id_equal_to_vocab_size", recorded(with_h5(token_out_of_vocab(VOCAB_SIZE))), SHARD,
     [str(VOCAB_SIZE)]),
    ("token_id_65535", recorded(with_h5(token_out_of_vocab(65535))), SHARD, ["65535", str(VOCAB_SIZE)]),
    ("doc_offsets_decrease", recorded(with_h5(decreasing_offsets)), SHARD, ["doc_offsets"]),
    ("shard_num_tokens_wrong", with_index(shard_tokens_plus_one), SHARD, ["tokens"]),
    ("shard_num_tokens_not_summing_to_total", with_index(shard_tokens_plus_one_total_unchanged), INDEX,
     ["num_tokens"]),
    ("shard_num_documents_wrong", with_index(shard_documents_minus_one), SHARD, ["doc_offsets"]),
    ("shard_bytes_wrong", with_index(set_shard_key("bytes", 12345)), SHARD, ["12345"]),
    ("vocab_size_smaller_than_shards", with_index(set_key("vocab_size", 300)), "shard-00000.h5",
     ["vocab_size"]),
    ("vocab_size_too_large_for_uint16", with_index(set_key("vocab_size", 100000)), INDEX, ["token_dtype"]),
    ("token_dtype_uint32_for_uint16_shards", with_index(set_key("token_dtype", "uint32")), "shard-00000.h5",
     ["uint32"]),
    ("token_dtype_unknown", with_index(set_key("token_dtype", "float16")), INDEX, ["token_dtype"]),
    ("eos_id_differs", with_index(set_key("eos_id", 1)), "shard-00000.h5", ["eos_id"]),
    ("tokenizer_hash_differs", with_index(set_key("tokenizer_hash", "other")), "shard-00000.h5",
     ["tokenizer_hash"]),
    ("shard_file_outside_folder", with_index(set_shard_key("file", "../shard-00002.h5")), INDEX, ["file"]),
    ("shard_listed_twice", with_index(set_shard_key("file", "shard-00001.h5")), INDEX, ["shard-00001.h5"]),
    ("crc32c_not_hex", with_index(set_shard_key("crc32c", "xyz")), INDEX, ["crc32c"]),
    ("file_crc32c_not_hex", with_index(set_shard_key("file_crc32c", 12345)), INDEX, ["file_crc32c"]),
    ("file_crc32c_wrong", with_index(set_shard_key("file_crc32c", "00000000")), SHARD, ["file CRC32C"]),
    ("num_tokens_a_string", with_index(set_key("num_tokens", "many")), INDEX, ["num_tokens"]),
    ("wrong_format", with_index(set_key("format", "not-loom")), INDEX, ["format"]),
    ("index_not_json", malformed('{"format": "loom-dataset", '), INDEX, []),
    ("index_empty", malformed(""), INDEX, []),
    ("index_cut_in_half", cut_index, INDEX, []),
    ("index_not_an_object", malformed("[1, 2, 3]"), INDEX, []),
    ("index_without_keys", malformed("{}"), INDEX, ["format"]),
]


@pytest.mark.parametrize("case,damage,name,fragments", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damaged_dataset_is_refused_naming_the_file(copy, case, damage, name, fragments):
    damage(copy)
    assert_refused("inspect", copy, names=[copy / name], fragments=fragments)
    if name != INDEX:
        # --verify reads everything; it may meet the checksum first, but it
        # still names the damaged shard.
        assert_refused("inspect", copy, "--verify", names=[copy / name])


def test_changed_token_fails_only_the_checksum_verification(copy):
    path = copy / SHARD
    with h5py.File(path, "r+") as f:
        tokens = f["tokens"]
        assert tokens.dtype == np.uint16
        tokens[100] = (int(tokens[100]) + 1) % VOCAB_SIZE  # a valid id of the same dtype
    assert_refused("inspect", copy, names=[path], fragments=["file CRC32C"])
    # With index.json's size and file checksum made to agree, structure, sizes
    # and id range are all fine: only the data checksum can tell.
    index = read_index(copy)
    record_shard_file(index, 2, path)
    write_index(copy, index)
    proc = run_loom("inspect", copy)
    assert SHARD in proc.stdout
    assert_refused("inspect", copy, "--verify", names=[path], fragments=["crc32c", read_index(copy)["shards"][2]["crc32c"]])


def test_inspect_of_a_missing_folder_names_it(tmp_path):
    assert_refused("inspect", tmp_path / "nowhere", names=[tmp_path / "nowhere"])


# ---------------------------------------------------------------- bad prepare inputs

# Kinds loom still refuses, and what the message names.
UNSUPPORTED = {"WordPiece": "WordPiece", "WordLevel": "WordLevel", "normalizer": "Precompiled",
               "pre_tokenizer": "UnicodeScripts"}


def unsupported(tokenizer, tmp_path, kind):
    spec = json.loads(tokenizer.read_text())
    if kind == "normalizer":
        spec["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    elif kind == "pre_tokenizer":
        spec["pre_tokenizer"] = {"type": "UnicodeScripts"}
    else:
        spec["model"]["type"] = kind
    path = tmp_path / f"tokenizer-{kind}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED))
@pytest.mark.parametrize("command", ["prepare", "inspect"])
def test_unsupported_tokenizer_is_refused_naming_it(tokenizer, small_input, dataset, tmp_path, kind, command):
    path = unsupported(tokenizer, tmp_path, kind)
    out = tmp_path / "out"
    if command == "prepare":
        assert_refused("prepare", "--tokenizer", path, "--input", small_input, "--output", out,
                       names=[path], fragments=[UNSUPPORTED[kind]])
        assert_not_a_dataset(out)
    else:
        assert_refused("inspect", dataset, "--tokenizer", path, names=[path])


def test_missing_tokenizer_is_refused_naming_it(small_input, tmp_path):
    out = tmp_path / "out"
    assert_refused("prepare", "--tokenizer", tmp_path / "nothere.json", "--input", small_input, "--output", out,
                   names=[tmp_path / "nothere.json"])
    assert_not_a_dataset(out)


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n\n"], ids=["empty", "blank_lines"])
def test_input_without_documents_is_refused_naming_it(tokenizer, tmp_path, content):
    path = tmp_path / "input.txt"
    path.write_text(content)
    out = tmp_path / "out"
    assert_refused("prepare", "--tokenizer", tokenizer, "--input", path, "--output", out, names=[path])
    assert_not_a_dataset(out)


def test_missing_input_is_refused_naming_it(tokenizer, small_input, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nothere.txt"
    assert_refused("prepare", "--tokenizer", tokenizer, "--input", small_input, missing, "--output", out,
                   names=[missing])
    assert_not_a_dataset(out)


def test_eos_token_outside_the_vocabulary_is_refused(tokenizer, small_input, tmp_path):
    out = tmp_path / "out"
    assert_refused("prepare", "--tokenizer", tokenizer, "--input", small_input, "--output", out,
                   "--eos-token", "<|no such token|>", names=[tokenizer], fragments=["<|no such token|>"])
    assert_not_a_dataset(out)


@pytest.mark.parametrize("bad_line,fragment", [
    ({"body": "the text is elsewhere"}, "text"),
    ({"text": 5}, "text"),
    ('{"text": "unterminated', "JSON"),
], ids=["field_missing", "field_not_a_string", "not_json"])
def test_bad_jsonl_line_is_refused_naming_file_and_line(tokenizer, small_documents, tmp_path, bad_line, fragment):
    path = tmp_path / "input.jsonl"
    lines = [json.dumps({"text": d}) for d in small_documents]
    lines.insert(40, bad_line if isinstance(bad_line, str) else json.dumps(bad_line))
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert_refused("prepare", "--tokenizer", tokenizer, "--input", path, "--output", out,
                   "--shard-tokens", SHARD_TOKENS, names=[f"{path}:41"], fragments=[fragment])
    assert_not_a_dataset(out)


def test_prepare_refuses_a_folder_that_holds_a_dataset(copy, tokenizer, small_input):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert_refused("prepare", "--tokenizer", tokenizer, "--input", small_input, "--output", copy,
                   names=[copy], fragments=["index.json"])
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


# ---------------------------------------------------------------- interrupted prepare

@pytest.fixture(scope="module")
def large_input(work, corpus):
    path = work / "large.txt"
    text = corpus.read_text()
    with path.open("w") as f:
        for _ in range(15):
            f.write(text)
            f.write("\n")
    return path


def interrupted_prepare(tokenizer, large_input, out, sig):
    """Starts a long prepare, sends `sig` once a shard is complete (or after
    ~1 s), and returns the exit status."""
    proc = subprocess.Popen(
        [LOOM_BIN, "prepare", "--tokenizer", str(tokenizer), "--input", str(large_input), "--output", str(out),
         "--shard-tokens", "2000000", "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # A shell that starts the tests in the background (`make test &`)
        # leaves SIGINT ignored, and an ignored signal stays ignored through
        # exec: give prepare the default action a terminal's Ctrl-C meets.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and any(p.suffix == ".h5" for p in out.iterdir()):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "prepare finished before it could be interrupted: make the input bigger"
        proc.send_signal(sig)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_interrupted_prepare_leaves_no_index(tokenizer, large_input, small_input, tmp_path, sig):
    out = tmp_path / "out"
    status = interrupted_prepare(tokenizer, large_input, out, sig)
    assert status != 0
    assert not (out / "index.json").exists(), sorted(p.name for p in out.iterdir())
    proc = run_loom("inspect", out, expect=2)
    assert proc.stderr.count("\n") == 1 and str(out) in proc.stderr, proc.stderr

    # A new prepare in the same folder succeeds and keeps none of the
    # interrupted run's shards.
    run_loom("prepare", "--tokenizer", tokenizer, "--input", small_input, "--output", out, "--shard-tokens",
             "2000000")
    index = read_index(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json"] + [s["file"] for s in index["shards"]])
    run_loom("inspect", out, "--verify")


# ---------------------------------------------------------------- input formats and threads

def test_jsonl_text_field_gives_the_same_tokens_as_plain_text(tokenizer, small_documents, tmp_path):
    documents = small_documents[:30]
    text = write_documents(tmp_path / "docs.txt", documents)
    jsonl = tmp_path / "docs.jsonl"
    # `text` holds something else, so only --text-field body gives the documents.
    jsonl.write_text("".join(json.dumps({"id": i, "text": 7, "body": d}) + "\n" for i, d in enumerate(documents)))
    run_loom("prepare", "--tokenizer", tokenizer, "--input", text, "--output", tmp_path / "from_text")
    run_loom("prepare", "--tokenizer", tokenizer, "--input", jsonl, "--output", tmp_path / "from_jsonl",
             "--text-field", "body")
    a, b = read_index(tmp_path / "from_text"), read_index(tmp_path / "from_jsonl")
    assert a["num_documents"] == b["num_documents"] == len(documents)
    reference = Tokenizer.from_file(str(tokenizer))
    expected = sum(len(reference.encode(d, add_special_tokens=False).ids) + 1 for d in documents)
    assert a["num_tokens"] == b["num_tokens"] == expected
    np.testing.assert_array_equal(all_tokens(tmp_path / "from_text"), all_tokens(tmp_path / "from_jsonl"))


def test_doc_per_file_makes_one_document_per_file(tokenizer, small_documents, tmp_path):
    files = [write_documents(tmp_path / f"part{i}.txt", small_documents[5 * i:5 * i + 5]) for i in range(3)]
    run_loom("prepare", "--tokenizer", tokenizer, "--input", *files, "--output", tmp_path / "per_file",
             "--doc-per-file")
    run_loom("prepare", "--tokenizer", tokenizer, "--input", *files, "--output", tmp_path / "per_block")
    per_file = read_index(tmp_path / "per_file")
    assert per_file["num_documents"] == 3
    assert read_index(tmp_path / "per_block")["num_documents"] == 15
    (tokens, offsets), = shard_arrays(tmp_path / "per_file")
    eos = per_file["eos_id"]
    assert len(offsets) == 4
    assert np.flatnonzero(tokens == eos).tolist() == (offsets[1:] - 1).tolist()


def test_dataset_does_not_depend_on_the_thread_count(tokenizer, corpus_documents, tmp_path):
    path = write_documents(tmp_path / "input.txt", first_documents(corpus_documents, 1_000_000))
    results = {}
    for threads in (1, 2, 4):
        out = tmp_path / f"threads{threads}"
        run_loom("prepare", "--tokenizer", tokenizer, "--input", path, "--output", out,
                 "--shard-tokens", SHARD_TOKENS, "--threads", threads)
        results[threads] = (read_index(out), shard_arrays(out))
    index, arrays = results[1]
    assert len(index["shards"]) >= 10
    for threads in (2, 4):
        other_index, other_arrays = results[threads]
        assert other_index == index, f"--threads {threads}"
        assert len(other_arrays) == len(arrays)
        for (tokens, offsets), (other_tokens, other_offsets) in zip(arrays, other_arrays):
            np.testing.assert_array_equal(tokens, other_tokens)
            np.testing.assert_array_equal(offsets, other_offsets)
