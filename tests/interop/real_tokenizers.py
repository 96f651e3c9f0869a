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
