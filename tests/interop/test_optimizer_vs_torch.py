"""loom's AdamW, gradient clipping and learning-rate schedules against
PyTorch's: torch.optim.AdamW (foreach=False, fused=False) with a decay and a
no-decay parameter group, torch.nn.utils.clip_grad_norm_(foreach=False), and
the schedule formulas of docs/configuration.md written out here in Python.

The C++ side is the small driver loom_optimizer_cli (tests/unit/optimizer_cli.cpp;
LOOM_OPTIMIZER_CLI names it): it reads the initial parameters and every step's
gradients from a safetensors file written here, runs 100 steps and writes the
final parameters, the learning rate and gradient norm of each step, and its
optimizer state.
"""
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

LOOM_OPTIMIZER_CLI = os.environ.get(
    "LOOM_OPTIMIZER_CLI", str(Path(__file__).resolve().parents[2] / "build" / "tests" / "loom_optimizer_cli"))

STEPS = 100
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
             warmup=10, train_steps=STEPS, min_lr_ratio=0.1)
SHAPES = {
    "model.embed_tokens.weight": (11, 8),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.q_proj.bias": (8,),
    "model.layers.0.mlp.up_proj.weight": (16, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (11, 8),
}
EMBEDDINGS = {"model.embed_tokens.weight", "lm_head.weight"}


# ---------------------------------------------------------------- reference

def expected_lr(step, decay, lr, warmup, train_steps, min_lr_ratio):
    """docs/configuration.md `schedule`: warmup step s gets lr * (s + 1) / warmup
    (Megatron's convention), then the decay shape down to min_lr_ratio * lr at
    train_steps; wsd holds lr and decays linearly over the last 20% of
    train_steps, rounded up to whole steps."""
    floor = lr * min_lr_ratio
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant":
        return lr
    start = warmup
    if decay == "wsd":
        start = max(warmup, train_steps - -(-train_steps // 5))
        if step < start:
            return lr
    progress = 1.0 if train_steps <= start else min(max((step - start) / (train_steps - start), 0.0), 1.0)
    if decay == "cosine":
        return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))
    return floor + (lr - floor) * (1 - progress)  # linear and wsd


def decayed(name, decay_embeddings):
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return False
    return decay_embeddings or name not in EMBEDDINGS


def make_inputs(seed=0):
    """Initial parameters and per-step gradients. The gradient scale varies
    with the step so that the global norm crosses a clip limit of 1 both ways."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in SHAPES.items():
        if name.endswith("norm.weight"):
            params[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            params[name] = 0.5 * torch.randn(shape, generator=gen)
    grads = []
    for step in range(STEPS):
        scale = 0.02 * (1 + (step * 7) % 13)
        grads.append({name: scale * torch.randn(shape, generator=gen) for name, shape in SHAPES.items()})
    return params, grads


def run_torch(params, grads, decay, clip, decay_embeddings):
    tensors = {name: p.clone().requires_grad_(True) for name, p in params.items()}
    order = list(SHAPES)
    groups = [
        {"params": [tensors[n] for n in order if decayed(n, decay_embeddings)], "weight_decay": HYPER["weight_decay"]},
        {"params": [tensors[n] for n in order if not decayed(n, decay_embeddings)], "weight_decay": 0.0},
    ]
    assert any(t is tensors["model.layers.0.input_layernorm.weight"] for t in groups[1]["params"])
    optimizer = torch.optim.AdamW(groups, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                  foreach=False, fused=False)
    ordered = [tensors[n] for n in order]
    lrs, norms = [], []
    for step in range(STEPS):
        for name in order:
            tensors[name].grad = grads[step][name].clone()
        if clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(ordered, clip, foreach=False)
        else:
            norm = torch.nn.utils.get_total_norm([t.grad for t in ordered], foreach=False)
        lr = expected_lr(step, decay, HYPER["lr"], HYPER["warmup"], HYPER["train_steps"], HYPER["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        lrs.append(lr)
        norms.append(norm.item())
    state = {}
    for name in order:
        s = optimizer.state[tensors[name]]
        state[f"optimizer.exp_avg.{name}"] = s["exp_avg"]
        state[f"optimizer.exp_avg_sq.{name}"] = s["exp_avg_sq"]
    return {n: t.detach() for n, t in tensors.items()}, torch.tensor(lrs, dtype=torch.float64), \
        torch.tensor(norms, dtype=torch.float64), state


def run_loom(tmp, params, grads, decay, clip, decay_embeddings):
    tensors = {f"p.{name}": p for name, p in params.items()}
    for step, step_grads in enumerate(grads):
        tensors.update({f"g.{step}.{name}": g for name, g in step_grads.items()})
    inputs, outputs = tmp / "in.safetensors", tmp / "out.safetensors"
    save_file(tensors, str(inputs), metadata={"params": ",".join(SHAPES)})
    args = [LOOM_OPTIMIZER_CLI, inputs, outputs, "--steps", STEPS, "--decay", decay, "--clip", repr(float(clip)),
            "--lr", repr(HYPER["lr"]), "--beta1", repr(HYPER["beta1"]), "--beta2", repr(HYPER["beta2"]),
            "--eps", repr(HYPER["eps"]), "--weight-decay", repr(HYPER["weight_decay"]),
            "--warmup", HYPER["warmup"], "--train-steps", HYPER["train_steps"],
            "--min-lr-ratio", repr(HYPER["min_lr_ratio"])]
    if not decay_embeddings:
        args.append("--no-decay-embeddings")
    proc = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"loom_optimizer_cli exited {proc.returncode}\n{proc.stderr}"
    return load_file(str(outputs))


def relative_difference(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / max(b.abs().max().item(), 1e-12)).item()


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd", "constant"])
def test_adamw_with_clipping_and_schedule_matches_torch(tmp, decay, clip):
    params, grads = make_inputs()
    loom = run_loom(tmp, params, grads, decay, clip, decay_embeddings=True)
    final, lrs, norms, state = run_torch(params, grads, decay, clip, decay_embeddings=True)

    assert relative_difference(loom["lr"], lrs) <= 1e-12
    assert relative_difference(loom["grad_norm"], norms) <= 1e-6
    if clip > 0:
        assert (norms > clip).any() and (norms < clip).any(), "the gradients should cross the clip limit both ways"
    assert loom["optimizer.step"].item() == STEPS
    for name in SHAPES:
        diff = relative_difference(loom[f"p.{name}"], final[name])
        print(f"{decay} clip={clip} {name}: max relative difference {diff:.3g}")
        assert diff <= 1e-6, name
        # Moving at all: the comparison is not between two untouched copies.
        assert not torch.equal(final[name], params[name]), name
    for key, expected in state.items():
        assert relative_difference(loom[key], expected) <= 1e-6, key


def test_embeddings_left_undecayed_match_torch_with_them_in_the_no_decay_group(tmp):
    params, grads = make_inputs(seed=1)
    loom = run_loom(tmp, params, grads, "cosine", 1.0, decay_embeddings=False)
    final, _, _, _ = run_torch(params, grads, "cosine", 1.0, decay_embeddings=False)
    decayed_run, _, _, _ = run_torch(params, grads, "cosine", 1.0, decay_embeddings=True)
    for name in SHAPES:
        assert relative_difference(loom[f"p.{name}"], final[name]) <= 1e-6, name
    # The flag matters: decaying the embeddings would have given other values.
    assert relative_difference(final["lm_head.weight"], decayed_run["lm_head.weight"]) > 1e-6


def test_schedule_formulas_cover_warmup_and_the_floor():
    """The Python reference itself, on the endpoints the docs promise."""
    lr, floor = HYPER["lr"], HYPER["lr"] * HYPER["min_lr_ratio"]
    for decay in ["cosine", "linear", "wsd"]:
        assert expected_lr(0, decay, lr, 10, 100, 0.1) == pytest.approx(lr / 10)
        assert expected_lr(9, decay, lr, 10, 100, 0.1) == pytest.approx(lr)
        assert expected_lr(100, decay, lr, 10, 100, 0.1) == pytest.approx(floor)
        assert expected_lr(500, decay, lr, 10, 100, 0.1) == pytest.approx(floor)
    assert expected_lr(80, "wsd", lr, 10, 100, 0.1) == lr
    assert expected_lr(90, "wsd", lr, 10, 100, 0.1) == pytest.approx((lr + floor) / 2)
    assert expected_lr(500, "constant", lr, 10, 100, 0.1) == lr
