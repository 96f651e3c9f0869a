"""Real tokenizer folders for the tests, made without the Hub.

launch/setup.sh extracts the models/ folder of llama.cpp (from the
llama-cpp-python source distribution) into llama_cpp_dir(): GGUF vocabularies
of real models (ggml-vocab-*.gguf) and real chat templates
(models/templates/*.jinja). transformers (with the `gguf` package) turns a GGUF
vocabulary into a tokenizer; what its conversion leaves out of the Hub's
tokenizer.json is put back here, so the folder is the one a user downloads:

  llama3_tokenizer_dir(path): Llama-3.1-Instruct's tokenizer (128,256 ids):
      model.ignore_merges true, the post-processor that starts every encoding
      with <|begin_of_text|>, eos_token <|eot_id|> (the instruct model's), and
      chat_template.jinja holding meta-llama/Llama-3.1-8B-Instruct's template (transformers 5
      writes tokenizer.json, tokenizer_config.json and chat_template.jinja).

The conversion takes most of a minute, so its result is kept under
~/.cache/loom/fixtures and copied from there.
"""
import os
import shutil
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # launch/setup.sh's LLAMA_CPP_PYTHON_VERSION
FIXTURES = Path(os.environ.get("LOOM_FIXTURES", Path.home() / ".cache" / "loom" / "fixtures"))

LLAMA3_BOS, LLAMA3_EOT = "<|begin_of_text|>", "<|eot_id|>"
LLAMA3_VOCAB = 128256
# generation_config.json of meta-llama/Llama-3.1-8B-Instruct.
LLAMA31_GENERATION_CONFIG = {
    "bos_token_id": 128000,
    "do_sample": True,
    "eos_token_id": [128001, 128008, 128009],
    "temperature": 0.6,
    "top_p": 0.9,
}


def llama_cpp_dir():
    """The llama.cpp folder launch/setup.sh extracted (common/jinja, models/)."""
    path = Path(os.environ.get("LOOM_LLAMA_CPP_DIR",
                               Path.home() / ".cache" / "loom" / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION))
    if not (path / "models").is_dir():
        raise FileNotFoundError(f"{path}/models is missing: run launch/setup.sh")
    return path


def chat_template(name):
    """The text of models/templates/NAME.jinja (a real model's chat template)."""
    return (llama_cpp_dir() / "models" / "templates" / f"{name}.jinja").read_text()


def _build_llama3(out):
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    converted = AutoTokenizer.from_pretrained(str(llama_cpp_dir() / "models"),
                                              gguf_file="ggml-vocab-llama-bpe.gguf")
    state = converted.backend_tokenizer.to_str()
    import json
    spec = json.loads(state)
    # The conversion appends an <|endoftext|> of its own past the 128,256 ids.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < LLAMA3_VOCAB]
    spec["model"]["ignore_merges"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    bos_id = tokenizer.token_to_id(LLAMA3_BOS)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{LLAMA3_BOS}:0 $A:0",
                                      pair=f"{LLAMA3_BOS}:0 $A:0 {LLAMA3_BOS}:1 $B:1",
                                      special_tokens=[(LLAMA3_BOS, bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOT,
                                   model_max_length=131072, clean_up_tokenization_spaces=True)
    fast.chat_template = chat_template("meta-llama-Llama-3.1-8B-Instruct")
    # Suites run side by side (ctest -j): each builds in a folder of its own
    # and the first rename wins; a later one finds the folder there.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(str(tmp))
    if not (tmp / "chat_template.jinja").exists():
        raise RuntimeError(f"transformers wrote no chat_template.jinja in {tmp}")
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def llama3_tokenizer_dir(path):
    """Writes Llama-3.1-Instruct's tokenizer folder at `path` (created); returns it as a Path."""
    cached = FIXTURES / f"llama3-tokenizer-{LLAMA_CPP_PYTHON_VERSION}"
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        _build_llama3(cached)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in cached.iterdir():
        shutil.copy2(f, path / f.name)
    return path


# --- the tokenizer.json files of model families (issue: tokenizers) ---------------------------
# name -> (GGUF vocabulary, what the Hub's tokenizer.json has that the
# conversion leaves out). The conversion writes the model, the added tokens and
# a post-processor; the rest is set here as the Hub's files have it.
FAMILY_VOCABS = {
    "llama2": "ggml-vocab-llama-spm.gguf",     # Llama-2, Mistral v0.1, TinyLlama: Metaspace + byte_fallback BPE
    "phi3": "ggml-vocab-phi-3.gguf",           # Phi-3: Prepend + Replace normalizers, no pre-tokenizer
    "gemma4": "ggml-vocab-gemma-4.gguf",       # Gemma 4: read from the GGUF here (see _build_gemma)
    "qwen2": "ggml-vocab-qwen2.gguf",          # Qwen2/2.5/3: NFC, then the Qwen split regex and ByteLevel
    "falcon": "ggml-vocab-falcon.gguf",        # Falcon: Punctuation, ByteLevel, then Digits and a Split
    "deepseek-llm": "ggml-vocab-deepseek-llm.gguf",
    "starcoder": "ggml-vocab-starcoder.gguf",
    "gpt2": "ggml-vocab-gpt-2.gguf",
}


def _hub_parts(name, spec):
    if name == "qwen2":
        # Qwen2's tokenizer.json normalizes to NFC first.
        spec["normalizer"] = {"type": "NFC"}
    elif name == "falcon":
        # tiiuae/falcon-7b's pre-tokenizer: splits on GPT-2 characters after ByteLevel.
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Punctuation", "behavior": "Contiguous"},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            {"type": "Digits", "individual_digits": False},
            {"type": "Split", "pattern": {"Regex": "[0-9][0-9][0-9]"}, "behavior": "Isolated", "invert": False},
        ]}
    return spec


def _build_gemma():
    """Gemma 4's tokenizer.json from its GGUF vocabulary (transformers 5
    cannot convert that file): the vocabulary, merges and special tokens
    of the GGUF, in the pipeline transformers' GemmaConverter writes
    (spaces become ▁ in the normalizer, no prefix, byte fallback, a
    decoder without Strip) and the <bos> the GGUF asks for."""
    from gguf import GGUFReader
    reader = GGUFReader(str(llama_cpp_dir() / "models" / FAMILY_VOCABS["gemma4"]))

    def values(key):
        field = reader.fields[key]
        return [field.parts[i] for i in field.data]

    tokens = [bytes(p).decode("utf-8") for p in values("tokenizer.ggml.tokens")]
    types = [int(p[0]) for p in values("tokenizer.ggml.token_type")]
    merges = [bytes(p).decode("utf-8").split(" ") for p in values("tokenizer.ggml.merges")]
    bos = int(values("tokenizer.ggml.bos_token_id")[0][0])
    CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == CONTROL} for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def family_tokenizer_json(name):
    """A cached tokenizer.json for FAMILY_VOCABS[name] (or Llama-3.1's, "llama3")."""
    import json
    if name == "llama3":
        cached = FIXTURES / f"llama3-tokenizer-{LLAMA_CPP_PYTHON_VERSION}"
        if not cached.is_dir():
            cached.parent.mkdir(parents=True, exist_ok=True)
            _build_llama3(cached)
        return cached / "tokenizer.json"
    out = FIXTURES / f"families-{LLAMA_CPP_PYTHON_VERSION}" / f"{name}.json"
    if out.exists():
        return out
    if name == "gemma4":
        spec = _build_gemma()
    else:
        from transformers import AutoTokenizer
        converted = AutoTokenizer.from_pretrained(str(llama_cpp_dir() / "models"), gguf_file=FAMILY_VOCABS[name])
        spec = _hub_parts(name, json.loads(converted.backend_tokenizer.to_str()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(spec, ensure_ascii=False))
    os.replace(tmp, out)
    return out


def llama_cpp_expected_ids(gguf_name):
    """llama.cpp's ids for its test strings (models/NAME.out), one list per string."""
    text = (llama_cpp_dir() / "models" / f"{gguf_name}.out").read_text(encoding="utf-8")
    return [[int(x) for x in line.split()] for line in text.split("\n")[:len(llama_cpp_test_strings(gguf_name))]]


def llama_cpp_test_strings(gguf_name):
    """llama.cpp's test strings for a vocabulary (models/NAME.inp)."""
    text = (llama_cpp_dir() / "models" / f"{gguf_name}.inp").read_text(encoding="utf-8")
    return text.split("\n__ggml_vocab_test__\n")[:-1] if text.endswith("\n__ggml_vocab_test__\n") else \
        text.split("\n__ggml_vocab_test__\n")
