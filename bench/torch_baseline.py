"""The PyTorch baseline loom's training speed is compared with.

Trains the model a loom config describes with transformers' LlamaForCausalLM
(SDPA attention) and torch.optim.AdamW, the way a PyTorch user would: the same
shape, sequence length, micro-batch, gradient accumulation, clipping and
precision (fp32, or bf16 autocast over fp32 weights), on random tokens (speed
does not depend on the data). Prints one JSON line:

  {"impl": "transformers-eager", "tokens_per_s": ..., "step_time_s": ..., ...}

Usage (see bench/gpu/bench_gpu.py and bench/cpu_vs_torch.sh):
  python bench/torch_baseline.py --config configs/tiny.yaml --device cpu --steps 6 --warmup 2 \
      [--set batch.micro_batch_size=4 ...] [--compile] [--threads N]

Without transformers installed it says so and exits 3, so a caller can report
the baseline as missing instead of failing.
"""

import argparse
import json
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="loom YAML config (model, data.seq_len, batch, precision)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override, as loom's --set")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave)")
    return parser.parse_args()


def load_config(path, overrides):
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f)
    for item in overrides:
        key, _, value = item.partition("=")
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config


def llama_config(model):
    from transformers import LlamaConfig

    rope = model.get("rope_scaling") or "none"
    rope_scaling = None
    if isinstance(rope, dict) and rope.get("type", "none") != "none":
        rope_scaling = {"rope_type": rope["type"], "factor": float(rope.get("factor", 1.0))}
        if rope["type"] == "llama3":
            rope_scaling.update(
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            )
    heads = int(model["num_heads"])
    return LlamaConfig(
        hidden_size=int(model["hidden_size"]),
        intermediate_size=int(model["intermediate_size"]),
        num_hidden_layers=int(model["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(model.get("num_kv_heads") or heads),
        head_dim=int(model.get("head_dim") or int(model["hidden_size"]) // heads),
        vocab_size=int(model["vocab_size"]),
        max_position_embeddings=int(model.get("max_seq_len", 2048)),
        rope_theta=float(model.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(model.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(model.get("tie_embeddings", False)),
        attention_bias=bool(model.get("attention_bias", False)),
        mlp_bias=bool(model.get("mlp_bias", False)),
        attn_implementation="sdpa",
    )


def main():
    args = parse_args()
    import torch

    try:
        import transformers
        from transformers import LlamaForCausalLM
    except ImportError as error:
        print(json.dumps({"impl": "transformers", "error": f"transformers not importable: {error}"}))
        return 3
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    config = load_config(args.config, args.set)
    model_cfg = config["model"]
    seq_len = int(config.get("data", {}).get("seq_len") or model_cfg.get("max_seq_len", 2048))
    batch = config.get("batch", {})
    micro = int(batch.get("micro_batch_size", 1))
    global_batch = int(batch.get("global_batch_size") or micro)
    accumulation = global_batch // micro
    optim = config.get("optimizer", {})
    bf16 = config.get("precision", {}).get("compute", "fp32") == "bf16"
    device = torch.device(args.device)

    torch.manual_seed(1234)
    model = LlamaForCausalLM(llama_config(model_cfg)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=float(optim.get("lr", 3e-4)),
        betas=tuple(optim.get("betas", [0.9, 0.95])),
        eps=float(optim.get("eps", 1e-8)),
        weight_decay=float(optim.get("weight_decay", 0.1)),
    )
    clip = float(optim.get("clip_grad_norm", 1.0))
    forward = torch.compile(model) if args.compile else model
    vocab = int(model_cfg["vocab_size"])
    generator = torch.Generator(device="cpu").manual_seed(0)

    def step():
        for _ in range(accumulation):
            ids = torch.randint(0, vocab, (micro, seq_len + 1), generator=generator).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = forward(input_ids=ids[:, :-1]).logits
            # As loom: the loss in fp32 over every next-token target.
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
            (loss / accumulation).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step().item()
    sync()
    warmup_s = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    sync()
    seconds = time.perf_counter() - start
    tokens = args.steps * global_batch * seq_len
    record = {
        "impl": "transformers-compile" if args.compile else "transformers-eager",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens / seconds,
        "step_time_s": seconds / args.steps,
        "warmup_s": warmup_s,
        "loss": loss.item(),
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
