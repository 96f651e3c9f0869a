"""A fresh run starts from the same weights on every layout, bit for bit.

Each rank draws only its own part of the initial weights (its tp shards, its
pipeline stage), each value a function of run.seed, the tensor's name and the
element's index (docs/parallelism.md, "Initial weights"). One rank, tp 2,
pp 2, tp 2 x pp 2 and dp 2 with ZeRO-1 each train one step that cannot move
a weight (learning rate 1e-30 over an AdamW eps of 1e30: every update
underflows to zero, and no weight decay), and the exported fp32 weights must
equal, byte for byte, those `loom init` writes for the same config and seed.
"""
import numpy as np
import pytest
from safetensors.numpy import load_file

from test_train_e2e import loom, train_args  # noqa: F401
from test_train_e2e import data  # noqa: F401 (fixture)
from test_tensor_parallel_e2e import mpi_loom

SEED = 77
INIT_STD = 0.02

LAYOUTS = {
    "single": {},
    "tp2": {"parallel.tp": 2},
    "pp2": {"parallel.pp": 2},
    "tp2-pp2": {"parallel.tp": 2, "parallel.pp": 2},
    "dp2-zero1": {"parallel.dp": 2, "parallel.zero_stage": 1},
}


def args(data, output_dir, name, **parallel):
    # tiny.yaml's 8 query and 4 kv heads (tp 2 splits both), two layers (pp 2
    # has one each), untied, so that lm_head is a tensor of its own.
    ranks = parallel.get("parallel.dp", 1) * parallel.get("parallel.tp", 1) * parallel.get("parallel.pp", 1)
    return train_args(data, output_dir, name, 1, 0,
                      **{"run.seed": SEED, "model.init_std": INIT_STD, "model.tie_embeddings": "false",
                         "optimizer.lr": 1e-30, "optimizer.eps": 1e30, "optimizer.weight_decay": 0, "schedule.warmup_steps": 0,
                         "checkpoint.export_hf_at_end": "false", "launch.ranks": ranks, **parallel}), ranks


def exported(checkpoint, output):
    loom("export", checkpoint, "--output", output, "--dtype", "float32")
    return load_file(str(output / "model.safetensors"))


@pytest.fixture(scope="module")
def initialized(data, tmp_path_factory):
    """The weights `loom init` writes for the runs' config and seed."""
    out = tmp_path_factory.mktemp("init")
    train, _ = args(data, out, "init")
    loom("init", *train[1:], "--output", out / "checkpoint")
    return exported(out / "checkpoint", out / "hf")


def test_loom_init_draws_the_configs_model(initialized):
    assert "lm_head.weight" in initialized and "model.layers.1.mlp.down_proj.weight" in initialized
    embed = initialized["model.embed_tokens.weight"]
    assert embed.shape == (512, 64) and embed.dtype == np.float32
    assert abs(embed.std() - INIT_STD) < 0.05 * INIT_STD, embed.std()
    assert np.all(initialized["model.norm.weight"] == 1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_fresh_run_starts_from_loom_inits_weights_on_every_layout(data, tmp_path, initialized, layout):
    run_args, ranks = args(data, tmp_path, "run", **LAYOUTS[layout])
    if ranks == 1:
        loom(*run_args)
    else:
        mpi_loom(ranks, run_args)
    weights = exported(tmp_path / "run" / "checkpoints" / "step-0000001", tmp_path / "hf")
    assert sorted(weights) == sorted(initialized)
    for name, expected in initialized.items():
        got = weights[name]
        assert got.shape == expected.shape, (layout, name)
        assert got.tobytes() == expected.tobytes(), (
            f"{layout}: {name} differs from loom init's by {np.abs(got - expected).max()}")
