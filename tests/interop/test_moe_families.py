"""Mixture-of-experts families (Note [mixture of experts] in model/moe.h)
against the real transformers: Mixtral (block_sparse_moe, w1/w2/w3, top-k
weights always renormalized, here with a window on every layer), Qwen2-MoE
(a shared expert behind a sigmoid gate, a dense layer among the sparse ones,
top-k weights not renormalized) and Qwen3-MoE (per-head q/k norms,
norm_topk_prob, decoder_sparse_step 2).

For each family one tiny model (hidden 64, 4 experts, top 2) is built by
transformers with random weights perturbed so that every router, norm and
bias matters, and saved as a Hub folder (transformers 5 writes one tensor
per expert). Then:
- loom's logits on that folder agree with transformers' within 1e-4 (fp32);
- 20 greedy tokens of `loom generate` are transformers' own;
- 3 steps of `loom train` from model.init_from export a folder that
  transformers loads as the same class with no missing or unexpected keys
  and whose logits are loom's own of the trained checkpoint;
- for Qwen2-MoE, tp 2 (with and without sequence parallelism), pp 2 and
  dp 2 runs of those 3 steps log the single
  rank's losses within 1e-5 and its router metrics, and a checkpoint of step
  2 resumed on tp 2 logs the single rank's step 3;
- and with expert parallelism (parallel.ep, parallel/expert_parallel.h):
  dp 2 x ep 2, dp 4 x ep 2, dp 4 x ep 4, dp 2 x ep 2 x tp 2 (and with
  sequence parallelism),
  dp 2 x ep 2 x pp 2 and dp 2 x cp 2 x ep 2 log the single rank's losses,
  gradient norms and router metrics; the dp 2 x ep 2 run's export (each expert gathered from the rank that holds it)
  is the single rank's, and its step-2 checkpoint (each expert written by
  one rank of its ep rank) resumed on dp 2 without ep logs step 3;
- with model.output_router_logits (Note [load-balancing loss] in model/moe.h): step 1's logged
  router_balance_loss is the per-row, per-layer B written out over transformers' router logits, and its
  gradient norm that of cross-entropy + coef * B; tp 2 (with and without sequence parallelism), pp 2 with
  full recomputation, dp 2, dp 2 x cp 2 x ep 2 and cp 2 x tp 2 with sequence parallelism train the single
  rank's steps with it;
- and with ZeRO under expert parallelism: dp 2 x ep 2 ZeRO-1 and ZeRO-2, dp 4 x ep 2 ZeRO-1 and ZeRO-2,
  dp 2 x ep 2 x tp 2 ZeRO-1, dp 2 x ep 2 x pp 2 ZeRO-2 and dp 2 x cp 2 x ep 2 ZeRO-1 log the single rank's
  losses and gradient norms; the dp 4 x ep 2 ZeRO-2 run's step-2 checkpoint holds the single rank's
  optimizer state, resumes on one rank and on dp 4 x ep 4 ZeRO-1, and its export loads in transformers; a
  one-rank checkpoint resumes on dp 2 x ep 2 ZeRO-2.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_loom
from hub_families import (LOSS_TOLERANCE, SEQ_LEN, VOCAB, check_greedy_generation, check_logits, check_trained_export,
                          make_family, metrics_rows, train as train_family)

SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)
FAMILIES = {
    # A window of 12 tokens on both layers, shorter than the prompts.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        SHAPE, intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=12)),
    # Layer 1 of 3 keeps a dense MLP (intermediate_size); the others have
    # 4 experts of 32 features and a shared expert of 48.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        SHAPE, intermediate_size=96, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])),
    # decoder_sparse_step 2: layer 0 dense, layer 1 sparse; head_dim 24.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        SHAPE, intermediate_size=96, num_hidden_layers=2, head_dim=24, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2)),
}
LAYOUT_FAMILY = "qwen2_moe"
LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    # Note [experts under tensor parallelism]: the router reads each rank's
    # slice of the sequence and its choices are gathered.
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    "pp2": (2, {"parallel.pp": 2}),
    "dp2": (2, {"parallel.dp": 2}),
    # Expert parallelism: ep carved out of dp.
    # Without checkpoints its export gathers every expert over ep.
    "dp2-ep2": (2, {"parallel.dp": 2, "parallel.ep": 2, "checkpoint.export_hf_at_end": "true"}),
    "dp4-ep2": (4, {"parallel.dp": 4, "parallel.ep": 2}),
    "dp4-ep4": (4, {"parallel.dp": 4, "parallel.ep": 4}),
    "dp2-ep2-tp2": (4, {"parallel.dp": 2, "parallel.ep": 2, "parallel.tp": 2}),
    "dp2-ep2-tp2-sp": (4, {"parallel.dp": 2, "parallel.ep": 2, "parallel.tp": 2,
                           "parallel.sequence_parallel": "true"}),
    "dp2-ep2-pp2": (4, {"parallel.dp": 2, "parallel.ep": 2, "parallel.pp": 2}),
    # Each cp rank routes its half of every sequence and exchanges over its own ep group.
    "dp2-cp2-ep2": (4, {"parallel.dp": 2, "parallel.cp": 2, "parallel.ep": 2}),
    # ZeRO under ep (Note [ZeRO with expert parallelism] in trainer/update.h): the dense state sharded over dp,
    # the experts' over edp (dp / ep ranks: whole at dp 2 x ep 2, halves at dp 4 x ep 2).
    "dp2-ep2-zero1": (2, {"parallel.dp": 2, "parallel.ep": 2, "parallel.zero_stage": 1}),
    "dp4-ep2-zero1": (4, {"parallel.dp": 4, "parallel.ep": 2, "parallel.zero_stage": 1}),
    "dp4-ep2-zero2": (4, {"parallel.dp": 4, "parallel.ep": 2, "parallel.zero_stage": 2}),
    "dp2-ep2-zero2": (2, {"parallel.dp": 2, "parallel.ep": 2, "parallel.zero_stage": 2}),
    "dp2-ep2-tp2-zero1": (4, {"parallel.dp": 2, "parallel.ep": 2, "parallel.tp": 2, "parallel.zero_stage": 1}),
    "dp2-ep2-pp2-zero2": (4, {"parallel.dp": 2, "parallel.ep": 2, "parallel.pp": 2, "parallel.zero_stage": 2}),
    # ZeRO-3 under ep: the layer wrapper gathers each layer's experts over edp beside its dense parameters over
    # dp (halves at dp 4 x ep 2; whole at dp 2 x ep 2, where only the dense parameters are gathered).
    "dp4-ep2-zero3": (4, {"parallel.dp": 4, "parallel.ep": 2, "parallel.zero_stage": 3,
                          "checkpoint.export_hf_at_end": "true"}),
    "dp2-ep2-zero3": (2, {"parallel.dp": 2, "parallel.ep": 2, "parallel.zero_stage": 3}),
    # ZeRO over the dp x cp replicas; the experts' edp is the block's two cp ranks.
    "dp2-cp2-ep2-zero1": (4, {"parallel.dp": 2, "parallel.cp": 2, "parallel.ep": 2, "parallel.zero_stage": 1}),
}


def train(tmp, family, name, ranks=1, expected_steps=3, **sets):
    """3 steps of `loom train` from the family's Hub folder; returns the run folder, its losses and its
    router metrics."""
    run, steps = train_family(tmp, FAMILIES[family][2], family, name, ranks,
                              model_lines="  num_experts: 4\n  num_experts_per_tok: 2\n",
                              expected_steps=expected_steps, **sets)
    return run, [row["loss"] for row in steps], [(row["router_load_max_over_mean"], row["router_aux_loss"])
                                                 for row in steps]


def grad_norms(run):
    return [row["grad_norm"] for row in metrics_rows(run) if "grad_norm" in row]


def assert_same_export(run, reference_run):
    """The run's exported weights are the reference run's: every tensor, within 1e-5."""
    from safetensors.torch import load_file
    exported = load_file(str(run / "hf" / "model.safetensors"))
    reference = load_file(str(reference_run / "hf" / "model.safetensors"))
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        assert (exported[key] - tensor).abs().max().item() < 1e-5, key


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(family, transformers model, scratch folder holding hf/ and data/, the single-rank run)."""
    name = request.param
    model, tmp = make_family(FAMILIES, name, tmp_path_factory)
    run, losses, router = train(tmp, name, "single")
    return name, model, tmp, run, (losses, router)


def test_hub_files_name_each_expert(family):
    """The folder transformers wrote (and so loom read) holds one tensor per expert."""
    name, _, tmp, _, _ = family
    from safetensors import safe_open
    with safe_open(str(tmp / "hf" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    block = "block_sparse_moe" if name == "mixtral" else "mlp"
    down = "w2" if name == "mixtral" else "down_proj"
    sparse_layer = 1 if name == "qwen3_moe" else 0
    assert f"model.layers.{sparse_layer}.{block}.experts.3.{down}.weight" in names, sorted(names)
    assert f"model.layers.{sparse_layer}.{block}.gate.weight" in names


def test_logits_match_transformers(family):
    name, model, tmp, _, _ = family
    check_logits(name, model, tmp)


def test_greedy_generation_matches_transformers(family):
    name, model, tmp, _, _ = family
    check_greedy_generation(name, model, tmp)


def test_router_metrics_are_logged_each_step(family):
    """Note [router metrics]: the worst layer's max / mean tokens per expert, between 1 (balanced) and
    E / k = 2 (an expert takes every token once); transformers' load-balancing loss over the step's
    tokens, E * sum_e f_e P_e with sum_e P_e = 1 and each f_e at most 1: in (0, E]."""
    _, _, _, _, (_, router) = family
    for load, aux in router:
        assert 1.0 <= load <= 2.0, router
        assert 0.0 < aux <= 4.0, router


def test_trained_export_loads_as_the_same_class_with_loom_logits(family):
    name, model, tmp, run, (losses, _) = family
    reloaded = check_trained_export(name, model, tmp, run, losses)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "sliding_window"):
        assert getattr(reloaded.config, key, None) == getattr(model.config, key, None), key


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_reproduces_single_rank_losses(family, layout):
    name, _, tmp, _, (single, single_router) = family
    if name != LAYOUT_FAMILY:
        pytest.skip(f"the layouts are checked on {LAYOUT_FAMILY}, whose block has every part")
    ranks, sets = LAYOUTS[layout]
    run, losses, router = train(tmp, name, layout, ranks, **sets)
    diffs = [abs(a - b) for a, b in zip(losses, single)]
    assert max(diffs) < LOSS_TOLERANCE, f"{name} {layout}: {losses} vs single rank {single}"
    # The router metrics summed over the ranks are the single rank's.
    for (load, aux), (single_load, single_aux) in zip(router, single_router):
        assert abs(load - single_load) < 1e-6 and abs(aux - single_aux) < 1e-6, (router, single_router)
    # So is the gradient norm (each expert counted once, on the rank that holds it).
    norms, single_norms = grad_norms(run), grad_norms(family[3])
    assert len(norms) == len(single_norms) == 3, (norms, single_norms)
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(norms, single_norms)), (norms, single_norms)
    if sets.get("checkpoint.export_hf_at_end") == "true":
        assert_same_export(run, family[3])


def test_resume_onto_tp2_continues_the_single_rank_run(family):
    """A checkpoint of step 2 on one rank, resumed on tp 2, logs the uninterrupted run's step 3."""
    name, _, tmp, _, (single, _) = family
    if name != LAYOUT_FAMILY:
        pytest.skip(f"resuming is checked on {LAYOUT_FAMILY}")
    run, _, _ = train(tmp, name, "checkpointed", 1, **{"checkpoint.interval": 2})
    _, losses, _ = train(tmp, name, "resumed_tp2", 2, **{"parallel.tp": 2, "checkpoint.resume": run / "checkpoints" /
                                                       "step-0000002"}, expected_steps=1)
    assert abs(losses[0] - single[2]) < LOSS_TOLERANCE, (losses, single)


def test_expert_parallel_export_and_resume_onto_dp2(family):
    """dp 2 x ep 2 exports the single rank's model (experts gathered over ep) and writes a step-2 checkpoint
    holding every expert once; dp 2 without ep resumes it and logs the single rank's step 3."""
    name, _, tmp, single_run, (single, _) = family
    if name != LAYOUT_FAMILY:
        pytest.skip(f"expert parallelism's checkpoints are checked on {LAYOUT_FAMILY}")
    run, losses, _ = train(tmp, name, "ep2_checkpointed", 2, **{
        "parallel.dp": 2, "parallel.ep": 2, "checkpoint.interval": 2, "checkpoint.export_hf_at_end": "true"})
    assert max(abs(a - b) for a, b in zip(losses, single)) < LOSS_TOLERANCE, (losses, single)
    assert_same_export(run, single_run)
    # The experts were split: ep rank 0 held (and wrote) experts 0 and 1 of each sparse layer, ep rank 1 the others.
    checkpoint = run / "checkpoints" / "step-0000002"
    assert json.loads((checkpoint / "manifest.json").read_text())["saved_by"]["ep"] == 2
    from safetensors import safe_open
    for rank, mine in ((0, {"0", "1"}), (1, {"2", "3"})):
        with safe_open(str(checkpoint / f"model-rank{rank:05d}.safetensors"), framework="pt") as f:
            experts = {key.split(".experts.")[1].split(".")[0] for key in f.keys() if ".experts." in key}
        assert experts == mine, (rank, experts)
    _, resumed, _ = train(tmp, name, "resumed_dp2", 2, **{
        "parallel.dp": 2, "checkpoint.resume": run / "checkpoints" / "step-0000002"}, expected_steps=1)
    assert abs(resumed[0] - single[2]) < LOSS_TOLERANCE, (resumed, single)


def checkpoint_tensors(checkpoint, prefix):
    """The whole tensors named `prefix`... of a loom checkpoint, put together from its pieces (each a flat range
    of the whole tensor here: no tp)."""
    from safetensors import safe_open
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    whole = {}
    for name, entry in manifest["tensors"].items():
        if not name.startswith(prefix):
            continue
        flat = torch.full((max(1, _numel(entry["shape"])),), float("nan"))
        for piece in entry["pieces"]:
            with safe_open(str(checkpoint / piece["file"]), framework="pt") as f:
                values = f.get_tensor(piece["key"]).reshape(-1).float()
            assert all(start == 0 and stop == size for (start, stop), size in zip(piece["box"], entry["shape"])), piece
            begin = piece.get("flat", [0, values.numel()])[0]
            flat[begin:begin + values.numel()] = values
        whole[name] = flat.reshape(entry["shape"])
    return whole


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_expert_parallel_zero_checkpoints_resume_across_layouts(family):
    """dp 4 x ep 2 with ZeRO-2 (dense state over dp 4, each expert's over its edp pair) writes a step-2
    checkpoint holding the single rank's AdamW state, which one rank, dp 4 x ep 4 with ZeRO-1 and dp 4 x ep 2
    with ZeRO-3 resume into the single rank's step 3; its export loads in transformers; and a one-rank step-2 checkpoint resumes on
    dp 2 x ep 2 with ZeRO-2."""
    name, model, tmp, single_run, (single, _) = family
    if name != LAYOUT_FAMILY:
        pytest.skip(f"expert parallelism's checkpoints are checked on {LAYOUT_FAMILY}")
    run, losses, _ = train(tmp, name, "ep2_zero2_checkpointed", 4, **{
        "parallel.dp": 4, "parallel.ep": 2, "parallel.zero_stage": 2, "checkpoint.interval": 2,
        "checkpoint.export_hf_at_end": "true"})
    assert max(abs(a - b) for a, b in zip(losses, single)) < LOSS_TOLERANCE, (losses, single)
    check_trained_export(name, model, tmp, run, losses)
    assert_same_export(run, single_run)
    checkpoint = run / "checkpoints" / "step-0000002"
    saved_by = json.loads((checkpoint / "manifest.json").read_text())["saved_by"]
    assert saved_by["ep"] == 2 and saved_by["zero_stage"] == 2, saved_by
    # The single rank's optimizer state at step 2, from its own checkpoint.
    one_rank, _, _ = train(tmp, name, "zero_reference_checkpointed", 1, **{"checkpoint.interval": 2})
    state = checkpoint_tensors(checkpoint, "optimizer.exp_avg")
    reference = checkpoint_tensors(one_rank / "checkpoints" / "step-0000002", "optimizer.exp_avg")
    assert sorted(state) == sorted(reference) and any(".experts." in key for key in state)
    # Within 1e-4 of each tensor's largest entry: the reductions' order differs (a wrong scale of the
    # experts' gradients, or a piece of another rank's, would be off by far more).
    for key, tensor in reference.items():
        worst = (state[key] - tensor).abs().max().item()
        assert worst <= 1e-4 * tensor.abs().max().item(), (key, worst, tensor.abs().max().item())
    _, resumed, _ = train(tmp, name, "ep2_zero2_resumed_one_rank", 1, **{
        "checkpoint.resume": checkpoint, "checkpoint.export_hf_at_end": "false"}, expected_steps=1)
    assert abs(resumed[0] - single[2]) < LOSS_TOLERANCE, (resumed, single)
    # Onto another split of the experts: each of dp 4 x ep 4's ranks holds one, its state whole.
    _, resumed, _ = train(tmp, name, "ep2_zero2_resumed_ep4_zero1", 4, **{
        "parallel.dp": 4, "parallel.ep": 4, "parallel.zero_stage": 1, "checkpoint.resume": checkpoint},
        expected_steps=1)
    assert abs(resumed[0] - single[2]) < LOSS_TOLERANCE, (resumed, single)
    # Onto ZeRO-3, which gathers each layer's experts over their edp pair as the layer runs.
    _, resumed, _ = train(tmp, name, "ep2_zero2_resumed_ep2_zero3", 4, **{
        "parallel.dp": 4, "parallel.ep": 2, "parallel.zero_stage": 3, "checkpoint.resume": checkpoint},
        expected_steps=1)
    assert abs(resumed[0] - single[2]) < LOSS_TOLERANCE, (resumed, single)
    _, resumed, _ = train(tmp, name, "one_rank_resumed_ep2_zero2", 2, **{
        "parallel.dp": 2, "parallel.ep": 2, "parallel.zero_stage": 2,
        "checkpoint.resume": one_rank / "checkpoints" / "step-0000002"}, expected_steps=1)
    assert abs(resumed[0] - single[2]) < LOSS_TOLERANCE, (resumed, single)


# Note [load-balancing loss] in model/moe.h. A coefficient far above the Hub's (0.001-0.02), so that the
# term's share of the gradient stands well above the tolerances.
BALANCE = {"model.output_router_logits": "true", "model.router_aux_loss_coef": 0.5}
BALANCE_LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": "true"}),
    "pp2-recompute": (2, {"parallel.pp": 2, "model.recompute": "full"}),
    # dp 2 deals each step's rows to the replicas in turn: other micro-batches than one rank's.
    "dp2": (2, {"parallel.dp": 2}),
    "dp2-cp2-ep2": (4, {"parallel.dp": 2, "parallel.cp": 2, "parallel.ep": 2}),
    "cp2-tp2-sp": (4, {"parallel.cp": 2, "parallel.tp": 2, "parallel.sequence_parallel": "true"}),
}


def dataset_rows(tmp):
    """The dataset's samples, [4, SEQ_LEN + 1]: step 1's global batch is all of them."""
    import h5py
    import numpy as np
    index = json.loads((tmp / "data" / "index.json").read_text())
    stream = np.concatenate([h5py.File(tmp / "data" / shard["file"], "r")["tokens"][:].astype(np.int64)
                             for shard in index["shards"]])
    samples = (len(stream) - 1) // SEQ_LEN
    assert samples == 4, samples
    return torch.from_numpy(np.stack([stream[j * SEQ_LEN: j * SEQ_LEN + SEQ_LEN + 1] for j in range(samples)]))


def balance_reference(model, rows, top_k):
    """transformers' forward of the rows: (cross-entropy, the mean over rows and sparse layers of
    B = E * sum_e f_e P_e written out from its router logits, the parameters)."""
    out = model(rows[:, :-1], output_router_logits=True)
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1))
    terms = []
    for layer_logits in out.router_logits:
        probs = torch.softmax(layer_logits.float(), -1).reshape(rows.size(0), SEQ_LEN, -1)  # [rows, T, E]
        experts = probs.size(-1)
        chosen = torch.topk(probs, top_k, -1).indices
        share = torch.nn.functional.one_hot(chosen, experts).sum(2).float().mean(1)  # f_e [rows, E]
        terms.append(experts * (share * probs.mean(1)).sum(-1))  # B per row
    return ce, torch.stack(terms).mean()


def grad_norm_of(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()


@pytest.fixture(scope="module")
def balanced_runs(family):
    """The family's single-rank run with the load-balancing loss."""
    name, _, tmp, _, _ = family
    run, losses, _ = train(tmp, name, "single-balanced", **BALANCE)
    return run, losses


def test_the_balance_loss_is_the_one_written_out_over_transformers_routers(family, balanced_runs):
    """Step 1 (the forward of the folder's weights over all four samples): loom's logged cross-entropy and
    router_balance_loss are transformers' own and B's written out from its router logits, and loom's gradient
    norm is that of cross-entropy + coef * B, not of the cross-entropy alone. The export says
    output_router_logits and the coefficient, and transformers loads it."""
    name, model, tmp, _, _ = family
    run, losses = balanced_runs
    first = metrics_rows(run)[0]
    rows = dataset_rows(tmp)
    ce, balance = balance_reference(model, rows, 2)
    coef = BALANCE["model.router_aux_loss_coef"]
    assert abs(first["loss"] - ce.item()) < LOSS_TOLERANCE, (first, ce.item())
    assert abs(first["router_balance_loss"] - balance.item()) < 1e-5 * balance.item(), (first, balance.item())
    with_term, without = grad_norm_of(model, ce + coef * balance), grad_norm_of(model, ce)
    model.zero_grad()
    assert abs(first["grad_norm"] - with_term) < 1e-5 * with_term, (first["grad_norm"], with_term, without)
    assert abs(with_term - without) > 1e-3 * with_term, (with_term, without)
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["output_router_logits"] is True and config["router_aux_loss_coef"] == coef, config
    check_trained_export(name, model, tmp, run, losses)


@pytest.mark.parametrize("layout", sorted(BALANCE_LAYOUTS))
def test_the_balance_loss_does_not_depend_on_the_layout(family, balanced_runs, layout):
    """Note [load-balancing loss]: per row and layer, so every layout trains the single rank's steps: its
    losses, gradient norms and router_balance_loss."""
    name, _, tmp, _, (plain, _) = family
    if name != LAYOUT_FAMILY:
        pytest.skip(f"the layouts are checked on {LAYOUT_FAMILY}, whose block has every part")
    single_run, single = balanced_runs
    ranks, sets = BALANCE_LAYOUTS[layout]
    run, losses, _ = train(tmp, name, f"{layout}-balanced", ranks, **BALANCE, **sets)
    assert max(abs(a - b) for a, b in zip(losses, single)) < LOSS_TOLERANCE, (losses, single)
    rows, single_rows = metrics_rows(run), metrics_rows(single_run)
    for row, expected in zip(rows, single_rows):
        assert abs(row["grad_norm"] - expected["grad_norm"]) <= 1e-5 * expected["grad_norm"], (rows, single_rows)
        assert abs(row["router_balance_loss"] - expected["router_balance_loss"]) <= 1e-5 * expected[
            "router_balance_loss"], (rows, single_rows)
    # The term trained: the balanced run's later steps are not the plain run's.
    assert abs(single[2] - plain[2]) > 10 * LOSS_TOLERANCE, (single, plain)


def test_a_folder_that_says_output_router_logits_trains_with_the_loss_unless_the_config_says_otherwise(
        family, balanced_runs):
    """model.init_from of the balanced run's export (config.json: output_router_logits true, coefficient 0.5):
    the folder's keys hold when the config does not give them, and the config's when it does."""
    name, _, tmp, _, _ = family
    if name != LAYOUT_FAMILY:
        pytest.skip("the keys are read alike for every family")
    source = tmp / "from-balanced"
    shutil.copytree(balanced_runs[0] / "hf", source / "hf")
    (source / "data").symlink_to(tmp / "data")
    run, _ = train_family(source, FAMILIES[name][2], name, "folder-keys", 1,
                          model_lines="  num_experts: 4\n  num_experts_per_tok: 2\n")
    assert all("router_balance_loss" in row for row in metrics_rows(run))
    assert json.loads((run / "hf" / "config.json").read_text())["output_router_logits"] is True
    run, _ = train_family(source, FAMILIES[name][2], name, "config-keys", 1,
                          model_lines="  num_experts: 4\n  num_experts_per_tok: 2\n",
                          **{"model.output_router_logits": "false"})
    assert not any("router_balance_loss" in row for row in metrics_rows(run))
    assert json.loads((run / "hf" / "config.json").read_text())["output_router_logits"] is False
