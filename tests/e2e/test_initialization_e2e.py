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


def step_one_weights(data, tmp_path, **sets):
    """Trains the one step that moves no weight on the layout `sets` gives,
    and returns the exported fp32 weights of its checkpoint."""
    run_args, ranks = args(data, tmp_path, "run", **sets)
    if ranks == 1:
        loom(*run_args)
    else:
        mpi_loom(ranks, run_args)
    return exported(tmp_path / "run" / "checkpoints" / "step-0000001", tmp_path / "hf")


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
    weights = step_one_weights(data, tmp_path, **LAYOUTS[layout])
    assert sorted(weights) == sorted(initialized)
    for name, expected in initialized.items():
        got = weights[name]
        assert got.shape == expected.shape, (layout, name)
        assert got.tobytes() == expected.tobytes(), (
            f"{layout}: {name} differs from loom init's by {np.abs(got - expected).max()}")


@pytest.fixture(scope="module")
def other_model(data, tmp_path_factory):
    """A Hub folder in bf16 of another seed's model, and a tp 2 run's sharded
    checkpoint of it: what model.init_from reads."""
    out = tmp_path_factory.mktemp("other")
    train, _ = args(data, out, "other")
    loom("init", *train[1:], "--set", "run.seed=5", "--output", out / "checkpoint")
    loom("export", out / "checkpoint", "--output", out / "hf", "--dtype", "bfloat16")
    sharded_args, ranks = args(data, out, "sharded", **{"parallel.tp": 2, "model.init_from": out / "hf"})
    mpi_loom(ranks, sharded_args)
    weights = {name: value.astype(np.float32) for name, value in exported(out / "hf", out / "hf32").items()}
    return out / "hf", out / "sharded" / "checkpoints" / "step-0000001", weights


@pytest.mark.parametrize("source", ["hub-bf16", "sharded-checkpoint"])
@pytest.mark.parametrize("layout", ["single", "tp2-pp2", "dp2-zero1"])
def test_init_from_gives_every_layout_the_folders_weights(data, tmp_path, other_model, source, layout):
    # Each rank reads only its part of the folder's tensors (converted from bf16).
    hub, sharded, expected = other_model
    folder = hub if source == "hub-bf16" else sharded
    weights = step_one_weights(data, tmp_path, **{**LAYOUTS[layout], "model.init_from": folder})
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        assert weights[name].tobytes() == value.tobytes(), (
            f"{layout} from {source}: {name} differs by {np.abs(weights[name] - value).max()}")
