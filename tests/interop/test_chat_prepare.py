"""`loom prepare --chat` against transformers (docs/data.md, "Chat data").

With Llama-3.1-Instruct's real tokenizer and chat template
(real_tokenizers.llama3_tokenizer_dir), loom's dataset holds exactly the ids of
tokenizer.apply_chat_template(messages, tokenize=True) for each conversation,
and a /loss_mask equal to the assistant spans, found here independently: by
rendering prefixes with transformers and mapping them through the Python
tokenizer's offsets, and checked against what the masked tokens decode to.
Four more real templates from llama.cpp's models/templates (Llama-3.2, which
reads strftime_now, Qwen2.5, SmolLM3 and Gemma-2) give the same ids as
transformers, the date fixed on both sides. Bad lines, and a template that
does not render prefix-stably (Phi-3.5 appends EOS to the last turn only),
are refused with exit code 2 naming the file and line.
"""
import datetime
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import transformers.utils.chat_template_utils as chat_template_utils
from transformers import AutoTokenizer

from conftest import LOOM_BIN
from real_tokenizers import LLAMA3_EOT, chat_template, llama3_tokenizer_dir

DATE = "2024-07-26"  # loom's default --chat-date

CONVERSATIONS = [
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3 + 3, twice?"},
     {"role": "assistant", "content": "6, then 6 again.\nDone."}],
    [{"role": "user", "content": "Grüße aus Köln, 世界! 🚀"},
     {"role": "assistant", "content": "¡Hola! Ça va? 你好 👋 — naïve café"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue"},
     {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "Green"}],
    # No assistant turn: a document whose mask is all zeros.
    [{"role": "user", "content": "Just saying hello."}],
]


class _FixedDatetime(datetime.datetime):
    """transformers' strftime_now reads datetime.now(): noon of DATE, as loom's --chat-date."""

    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26, 12, 0, 0)


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    monkeypatch.setattr(chat_template_utils, "datetime", _FixedDatetime)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return llama3_tokenizer_dir(tmp_path_factory.mktemp("llama3"))


def folder_with_template(llama3, tmp_path, name):
    """The Llama-3 tokenizer folder with models/templates/NAME.jinja as its chat template."""
    folder = tmp_path / name
    shutil.copytree(llama3, folder)
    (folder / "chat_template.jinja").write_text(chat_template(name))
    return folder


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations),
                    encoding="utf-8")
    return path


def prepare_chat(folder, inputs, out, *extra):
    args = [LOOM_BIN, "prepare", "--chat", "--tokenizer", str(folder / "tokenizer.json"), "--output", str(out),
            "--threads", "2"]
    for path in inputs:
        args += ["--input", str(path)]
    return subprocess.run(args + list(extra), capture_output=True, text=True, timeout=300)


def read_documents(out):
    """(ids, mask) per document of a loom dataset, read with h5py."""
    index = json.loads((out / "index.json").read_text())
    documents = []
    for shard in index["shards"]:
        with h5py.File(out / shard["file"], "r") as f:
            tokens, offsets, mask = f["tokens"][:], f["doc_offsets"][:], f["loss_mask"][:]
            assert f["loss_mask"].dtype == np.uint8 and mask.shape == tokens.shape
            assert f.attrs["format_version"] == 2
        for a, b in zip(offsets[:-1], offsets[1:]):
            documents.append((tokens[a:b].tolist(), mask[a:b].tolist()))
    return index, documents


def reference_ids(tokenizer, messages):
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(ids)


def reference_mask(tokenizer, messages):
    """1 on the tokens of what each assistant turn adds after its generation prompt, computed
    with transformers' renderer and the Python tokenizer's character offsets."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        turn = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        assert turn.startswith(prompt) and text.startswith(turn)
        spans.append((len(prompt), len(turn)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [int(any(start < b and end > a for a, b in spans)) for start, end in encoding["offset_mapping"]]


def test_llama3_ids_equal_apply_chat_template_and_masks_cover_the_assistant_turns(llama3, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(llama3))
    out = tmp_path / "chat"
    result = prepare_chat(llama3, [write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)], out)
    assert result.returncode == 0, result.stderr
    index, documents = read_documents(out)
    assert index["format_version"] == 2 and index["loss_mask"] is True
    assert len(documents) == len(CONVERSATIONS)
    for messages, (ids, mask) in zip(CONVERSATIONS, documents):
        assert ids == reference_ids(tokenizer, messages)
        assert mask == reference_mask(tokenizer, messages)
        # What the masked runs decode to: each assistant turn's content and its
        # end-of-turn token, nothing of the prompt (no EOS added by loom).
        runs, run = [], []
        for token, counted in zip(ids, mask):
            if counted:
                run.append(token)
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
        expected = [m["content"].strip() + LLAMA3_EOT for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs] == expected
    assert documents[-1][1] == [0] * len(documents[-1][0])

    inspect = subprocess.run([LOOM_BIN, "inspect", str(out), "--verify"], capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert "loss mask" in inspect.stdout and "every loss-mask value 0 or 1" in inspect.stdout


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.2-3B-Instruct", "Qwen-Qwen2.5-7B-Instruct",
                                  "HuggingFaceTB-SmolLM3-3B", "google-gemma-2-2b-it"])
def test_real_templates_render_to_the_ids_of_apply_chat_template(llama3, tmp_path, name):
    folder = folder_with_template(llama3, tmp_path, name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # Gemma-2's template refuses a system message.
    conversations = [c for c in CONVERSATIONS if not (name.startswith("google") and c[0]["role"] == "system")]
    out = tmp_path / "chat"
    result = prepare_chat(folder, [write_jsonl(tmp_path / "chats.jsonl", conversations)], out, "--chat-date", DATE)
    assert result.returncode == 0, result.stderr
    _, documents = read_documents(out)
    for messages, (ids, mask) in zip(conversations, documents, strict=True):
        assert ids == reference_ids(tokenizer, messages)
        assert mask == reference_mask(tokenizer, messages)


def test_chat_date_reaches_strftime_now(llama3, tmp_path):
    folder = folder_with_template(llama3, tmp_path, "meta-llama-Llama-3.2-3B-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS[:1])
    assert prepare_chat(folder, [tmp_path / "chats.jsonl"], tmp_path / "a", "--chat-date", "2025-01-02").returncode == 0
    _, [(ids, _)] = read_documents(tmp_path / "a")
    assert "Today Date: 02 Jan 2025" in tokenizer.decode(ids)
    assert ids != reference_ids(tokenizer, CONVERSATIONS[0])  # the default date gives other ids


def test_parts_merge_into_the_dataset_of_one_run(llama3, tmp_path):
    inputs = [write_jsonl(tmp_path / "a.jsonl", CONVERSATIONS[:2]), write_jsonl(tmp_path / "b.jsonl", CONVERSATIONS[2:])]
    assert prepare_chat(llama3, inputs, tmp_path / "whole").returncode == 0
    for part in ("0/2", "1/2"):
        result = prepare_chat(llama3, inputs, tmp_path / "parts", "--part", part)
        assert result.returncode == 0, result.stderr
    merged = subprocess.run([LOOM_BIN, "prepare", "--merge", str(tmp_path / "parts")], capture_output=True, text=True,
                            timeout=120)
    assert merged.returncode == 0, merged.stderr
    index, documents = read_documents(tmp_path / "parts")
    assert index["loss_mask"] is True
    assert documents == read_documents(tmp_path / "whole")[1]


@pytest.mark.parametrize("line, message", [
    ("this is not json", "not a JSON object"),
    ('{"text": "no messages"}', "no 'messages' list"),
    ('{"messages": []}', "no 'messages' list"),
    ('{"messages": [{"role": 7, "content": "hi"}]}', "messages[0].role: expected a string"),
    ('{"messages": [{"content": "hi"}]}', "messages[0]: no 'role'"),
])
def test_bad_lines_are_refused_naming_file_and_line(llama3, tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n\n" + line + "\n")
    result = prepare_chat(llama3, [path], tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert f"{path}:3: " in result.stderr and message in result.stderr
    assert not (tmp_path / "out" / "index.json").exists()
    assert not list((tmp_path / "out").glob("shard-*"))


def test_template_errors_and_unstable_renderings_are_refused(llama3, tmp_path):
    # Gemma-2's raise_exception: roles must alternate.
    gemma = folder_with_template(llama3, tmp_path, "google-gemma-2-2b-it")
    path = write_jsonl(tmp_path / "gemma.jsonl", [[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]])
    result = prepare_chat(gemma, [path], tmp_path / "out1")
    assert result.returncode == 2 and f"{path}:1: " in result.stderr and "alternate" in result.stderr, result.stderr

    # Phi-3.5 appends EOS after the last message only: a multi-turn
    # conversation's first assistant turn renders differently alone.
    phi = folder_with_template(llama3, tmp_path, "microsoft-Phi-3.5-mini-instruct")
    path = write_jsonl(tmp_path / "phi.jsonl", [CONVERSATIONS[0], CONVERSATIONS[1]])
    result = prepare_chat(phi, [path], tmp_path / "out2")
    assert result.returncode == 2, result.stderr
    assert f"{path}:2: " in result.stderr and "messages[1] (assistant)" in result.stderr
    assert "prefix-stable" in result.stderr

    # A template loom cannot parse fails before any input is read.
    broken = tmp_path / "broken"
    shutil.copytree(llama3, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    result = prepare_chat(broken, [path], tmp_path / "out3")
    assert result.returncode == 2 and "chat_template.jinja" in result.stderr, result.stderr

    # No template at all.
    bare = tmp_path / "bare"
    shutil.copytree(llama3, bare)
    (bare / "chat_template.jinja").unlink()
    result = prepare_chat(bare, [path], tmp_path / "out4")
    assert result.returncode == 2 and "no chat template" in result.stderr, result.stderr
