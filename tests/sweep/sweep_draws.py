"""What tests/sweep/layout_sweep.py draws: a model of a random family, its data settings and layouts, and
the rules by which loom should refuse a layout (docs/configuration.md)."""
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "smollm3", "mixtral", "qwen2_moe", "qwen3_moe",
         "gemma", "gemma2", "gemma3_text"]
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
# Not initialized at random by loom: these start from a Hub folder transformers writes (model.init_from).
GEMMA = {"gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
         "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}



def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def draw_model(rng, arch):
    heads = rng.choice([1, 2, 3, 4, 6, 8, 12])
    # heads / kv: 1 (MHA), 2, 3, ... or heads (MQA); kv 1 often, though it rules out tp.
    kv = 1 if rng.random() < 0.25 else rng.choice(divisors(heads)[1:] or [1])
    if arch == "qwen3" or rng.random() < 0.3:
        head_dim = rng.choice([2, 4, 6, 8, 10, 12, 16, 24])
        hidden = rng.randint(8, 96)
        if arch == "llama" and rng.random() < 0.8:  # else refused: transformers' LlamaConfig refuses it
            hidden = rng.choice([h for h in range(8, 97) if h % heads == 0])
    else:
        head_dim = 0
        hidden = rng.choice([h for h in range(8, 97) if h % heads == 0 and (h // heads) % 2 == 0])
    if rng.random() < 0.2:
        intermediate = rng.randrange(33, 161, 2)  # odd: no tp divides it
    else:
        intermediate = rng.choice([i for i in range(24, 161) if i % 12 == 0])
    m = {
        "architecture": arch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_layers": rng.randint(2, 6),
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": head_dim,
        # Mostly odd sizes, which no tp divides (the padded vocabulary).
        "vocab_size": rng.choice([97, 101, 127, 131, 157, 199, 211, 251, 256, 263, 300]),
        "tie_embeddings": rng.random() < 0.5,
        "rope_theta": rng.choice([10000.0, 500000.0, 1000.0]),
        "init_std": rng.choice([0.02, 0.05]),
    }
    if arch != "phi3" and rng.random() < 0.1:  # phi3 takes longrope only, whose factors depend on head_dim
        m["rope_scaling"] = rng.choice([{"type": "linear", "factor": 2.0},
                                        {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}])
    if arch == "llama":
        m["attention_bias"] = rng.random() < 0.3
        m["mlp_bias"] = rng.random() < 0.3
    if arch == "qwen3":
        m["attention_bias"] = rng.random() < 0.3
    if arch in ("mistral", "mixtral", "phi3") and rng.random() < (0.9 if arch == "mistral" else 0.4):
        m["sliding_window"] = rng.randint(2, 24)
    if arch in ("qwen2", "qwen3") and rng.random() < 0.3:
        m["sliding_window"] = rng.randint(2, 24)
        m["layer_types"] = [rng.choice(["full_attention", "sliding_attention"]) for _ in range(m["num_layers"])]
    if arch == "smollm3":
        m["nope_layers"] = sorted(rng.sample(range(m["num_layers"]), rng.randint(0, m["num_layers"] // 2)))
    if arch in MOE:
        experts = rng.choice([2, 3, 4, 6, 8])
        m["num_experts"] = experts
        m["num_experts_per_tok"] = rng.randint(1, min(experts, 3))
        if arch != "mixtral":
            m["moe_intermediate_size"] = rng.choice([rng.randrange(9, 65, 2), rng.choice([12, 24, 36, 48]),
                                                     rng.choice([12, 24, 36, 48])])
            m["norm_topk_prob"] = rng.random() < 0.5
            m["decoder_sparse_step"] = rng.choice([1, 1, 2])
            if rng.random() < 0.3:
                m["mlp_only_layers"] = [rng.randrange(m["num_layers"])]
        if rng.random() < 0.5:  # Note [load-balancing loss]: a term per sequence and sparse layer
            m["output_router_logits"] = True
            m["router_aux_loss_coef"] = rng.choice([0.01, 0.1, 0.5])
        if arch == "qwen2_moe":
            m["shared_expert_intermediate_size"] = rng.choice([rng.randrange(9, 65, 2), rng.choice([12, 24, 48]),
                                                              rng.choice([12, 24, 48])])
    return m


def make_gemma(rng, m, folder):
    """A gemma-family Hub folder of model m's shape, written by transformers with random weights; returns the
    model keys of a config that starts from it."""
    from hub_families import make_model
    arch = m["architecture"]
    head_dim = m["head_dim"] or m["hidden_size"] // m["num_heads"]
    config = dict(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                  num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                  num_key_value_heads=m["num_kv_heads"], head_dim=head_dim, max_position_embeddings=64,
                  tie_word_embeddings=m["tie_embeddings"])
    if arch in ("gemma2", "gemma3_text"):
        config.update(sliding_window=rng.randint(2, 24), query_pre_attn_scalar=rng.choice([head_dim, 24]))
    if arch == "gemma2":
        config.update(attn_logit_softcapping=rng.choice([None, 50.0]), final_logit_softcapping=rng.choice([None, 30.0]))
    config_name, model_name = GEMMA[arch]
    hub = make_model({arch: (config_name, model_name, config)}, arch, seed=rng.randint(1, 1000))
    # make_model's weights (0.15 std) with gemma's scaled embeddings make gradients whose fp32 rounding alone
    # reaches 2e-5 of the gradient norm (measured against an fp64 run of transformers: one rank and cp 2 off by
    # the same amount either way); a third of them keeps the checks about layouts.
    import torch
    with torch.no_grad():
        for name, p in hub.named_parameters():
            if "norm" not in name:
                p.mul_(0.3)
    hub.save_pretrained(folder)
    keys = ("architecture", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "vocab_size", "head_dim")
    return {**{k: m[k] for k in keys}, "head_dim": head_dim, "init_from": str(folder)}


def draw_data(rng):
    micro = rng.choice([1, 1, 2, 3, 4])
    return {
        "seq_len": rng.choice([8, 12, 13, 16, 17, 20, 24, 32, 40, 48]),
        "micro_batch_size": micro,
        # Micro-batches per step on one rank: dp divides it or the layout is refused.
        "global_batch_size": micro * rng.choice([1, 2, 3, 4, 4, 6, 8, 12]),
        "document_mask": rng.random() < 0.3,
        "steps": rng.choice([3, 4]),
        "clip": rng.choice([0.0, 1.0, 1.0]),
        "lr": rng.choice([1e-3, 3e-3]),
        "seed": rng.randint(1, 10**6),
        # Validation every 2 steps and after the last, on the training set: each dp replica evaluates
        # valid_batches / dp rounded up, so the losses compare where dp divides it.
        "valid_batches": rng.choice([1, 2, 3, 4, 6, 12]),
        "blend": rng.random() < 0.3,
    }


def factorize(n):
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def draw_layout(rng, model, ranks):
    lay = {"dp": 1, "cp": 1, "tp": 1, "pp": 1}
    for factor in factorize(ranks):
        axis = rng.choices(["dp", "cp", "tp", "pp"], weights=[3, 2, 4, 3])[0]
        lay[axis] *= factor
    lay["ep"] = rng.choice(divisors(lay["dp"])[1:] or [1]) if model["architecture"] in MOE and rng.random() < 0.7 else 1
    lay["zero_stage"] = rng.choice([0, 1, 2, 3]) if rng.random() < 0.5 else 0
    lay["sequence_parallel"] = lay["tp"] > 1 and rng.random() < 0.6
    lay["pp_schedule"], lay["virtual_stages"] = "1f1b", 1
    if lay["pp"] > 1:
        lay["pp_schedule"] = rng.choice(["afab", "1f1b", "interleaved"])
        if lay["pp_schedule"] == "interleaved":
            lay["virtual_stages"] = rng.choice([2, 2, 3])
    lay["recompute"] = rng.choice(["none", "none", "none", "selective", "full"])
    return lay


def predicted_refusal(model, data, lay):
    """Why loom should refuse this layout (the rules docs/configuration.md states), or None."""
    tp, cp, dp = lay["tp"], lay["cp"], lay["dp"]
    if model["num_heads"] % tp or model["num_kv_heads"] % tp:
        return "tp does not divide the heads"
    if model["intermediate_size"] % tp:
        return "tp does not divide intermediate_size"
    if model.get("moe_intermediate_size", 0) % tp or model.get("shared_expert_intermediate_size", 0) % tp:
        return "tp does not divide an expert's intermediate size"
    if lay["pp"] * lay["virtual_stages"] > model["num_layers"]:
        return "pp * virtual_stages > num_layers"
    if lay["sequence_parallel"] and (data["seq_len"] // cp) % tp:
        return "sequence parallelism: seq_len / cp not divisible by tp"
    if cp > 1 and data["seq_len"] % (2 * cp):
        return "cp: seq_len not divisible by 2 * cp"
    if lay["ep"] > 1 and (model["num_experts"] % lay["ep"] or dp % lay["ep"] or lay["zero_stage"] == 3):
        return "ep rules"
    if data["global_batch_size"] % (data["micro_batch_size"] * dp):
        return "global batch not a multiple of micro * dp"
    micro_batches = data["global_batch_size"] // (data["micro_batch_size"] * dp)
    if lay["pp_schedule"] == "interleaved" and micro_batches % lay["pp"]:
        return "interleaved: micro-batches per step not a multiple of pp"
    return None


def label(lay):
    parts = [f"{axis}{lay[axis]}" for axis in ("dp", "cp", "tp", "pp", "ep") if lay[axis] > 1]
    if lay["pp"] > 1:
        parts.append(lay["pp_schedule"] + (f"x{lay['virtual_stages']}" if lay["virtual_stages"] > 1 else ""))
    if lay["sequence_parallel"]:
        parts.append("sp")
    if lay["zero_stage"]:
        parts.append(f"zero{lay['zero_stage']}")
    if lay["recompute"] != "none":
        parts.append(lay["recompute"])
    return "-".join(parts) or "single"


SINGLE = {"dp": 1, "cp": 1, "tp": 1, "pp": 1, "ep": 1, "zero_stage": 0, "sequence_parallel": False,
          "pp_schedule": "1f1b", "virtual_stages": 1, "recompute": "none"}


def ranks_of(lay):
    return lay["dp"] * lay["cp"] * lay["tp"] * lay["pp"]
