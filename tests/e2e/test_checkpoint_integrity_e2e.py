"""Resuming past a damaged checkpoint (`checkpoint.resume: auto`).

A twelve-step run keeps checkpoints at steps 5, 10 and 12. Its newest one is
then damaged in one of four ways (a flipped byte, a truncated file, a
missing file, a manifest that disagrees with its files); resuming must name
the damaged file, pass over that checkpoint for step 10's, and finish with
the same losses and the same exported weights as the run that was not
damaged. With every checkpoint damaged the run is refused (exit code 2),
naming each.
"""
import json
import shutil

import pytest

from test_train_e2e import loom, losses_by_step, train_args
from test_train_e2e import data  # noqa: F401 (fixture)

STEPS = 12


def args_for(data, out, name):
    return train_args(data, out, name, STEPS, 5, **{"checkpoint.keep_last": 3})


@pytest.fixture(scope="module")
def original(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity")
    loom(*args_for(data, out, "original"))
    run = out / "original"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000012"
    return run


def flip_a_byte(ckpt):
    path = ckpt / "model-rank00000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    return path.name


def truncate(ckpt):
    path = ckpt / "optimizer-rank00000.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    return path.name


def remove_a_file(ckpt):
    path = ckpt / "trainer-state-rank00000.json"
    path.unlink()
    return path.name


def contradict_the_manifest(ckpt):
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    name = sorted(manifest["tensors"])[0]
    manifest["tensors"][name]["shape"] = [s + 1 for s in manifest["tensors"][name]["shape"]]
    path.write_text(json.dumps(manifest, indent=2))
    return name


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, remove_a_file, contradict_the_manifest],
                         ids=["flipped-byte", "truncated", "missing-file", "manifest-disagrees"])
def test_resume_passes_over_a_damaged_checkpoint(data, tmp_path, original, damage):
    run = tmp_path / "original"
    shutil.copytree(original, run)
    shutil.rmtree(run / "hf")
    named = damage(run / "checkpoints" / "step-0000012")
    # Rerun to step 12: latest (step 12) is damaged, so step 10 is resumed.
    out, _ = loom(*args_for(data, tmp_path, "original"))
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "step-0000012" in warning[0] and named in warning[0], out
    assert "resumed from " + str(run / "checkpoints" / "step-0000010") in out, out
    assert losses_by_step(run, STEPS) == losses_by_step(original, STEPS)
    assert (run / "hf" / "model.safetensors").read_bytes() == (original / "hf" / "model.safetensors").read_bytes()
    # Step 12 was written again, whole, and latest names it.
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000012"
    loom("inspect", run / "checkpoints" / "step-0000012")


def test_resume_with_every_checkpoint_damaged_is_refused(data, tmp_path, original):
    run = tmp_path / "original"
    shutil.copytree(original, run)
    for step in ("step-0000005", "step-0000010", "step-0000012"):
        flip_a_byte(run / "checkpoints" / step)
    metrics = (run / "metrics.jsonl").read_bytes()
    _, err = loom(*args_for(data, tmp_path, "original"), expect=2)
    assert "no checkpoint" in err and "passes verification" in err, err
    for step in ("step-0000005", "step-0000010", "step-0000012"):
        assert f"{step}/model-rank00000.safetensors" in err, err
    assert (run / "metrics.jsonl").read_bytes() == metrics, "a refused resume must leave the run folder as it was"
