"""Faults and bad inputs that docs/reliability.md lists and no other test
tries: a file-size limit (a full disk) while a checkpoint is written, a
dataset whose tokens do not fit the model, a resume into another model
shape or from a folder that is no checkpoint, a run folder that is a file,
loss-spike settings that cannot work and a damaged loss-spike record. Each
ends with a clear message and the documented exit code, and loses nothing.
Single rank, the tiny test model: the whole file takes seconds.
"""
import os
import resource
import subprocess

import pytest

from test_train_e2e import LOOM_BIN, data, loom, train_args  # noqa: F401 (data: fixture)


def loom_limited(args, file_size_limit):
    """`loom ARGS` with RLIMIT_FSIZE (ulimit -f) set to `file_size_limit` bytes."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([LOOM_BIN, *map(str, args)], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("bad-input")
    loom(*train_args(data, out, "run", 4, 2))
    return out


def test_a_file_size_limit_during_a_checkpoint_fails_naming_the_file_and_keeps_the_last_one(data, finished):
    run_dir = finished / "run"
    # Continued to step 6 under a 200 kB file-size limit: the step-6
    # checkpoint's weights (576 kB) cannot be written.
    longer = train_args(data, finished, "run", 6, 2)
    proc = loom_limited(longer, 200 * 1024)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "File too large" in proc.stderr and "step-0000006" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, f"one line expected:\n{proc.stderr}"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000004"
    assert not (ckpts / "step-0000006").exists()
    # Without the limit the same command resumes from step 4 and finishes.
    out, _ = loom(*longer)
    assert "resumed from" in out and "step-0000004" in out, out[-2000:]
    assert (ckpts / "latest").read_text().strip() == "step-0000006"
    assert not [p.name for p in ckpts.iterdir() if ".tmp" in p.name], sorted(p.name for p in ckpts.iterdir())


def test_a_resume_into_another_model_shape_is_refused_naming_the_tensor(data, finished):
    _, err = loom(*train_args(data, finished, "run", 8, 2, **{"model.intermediate_size": 96}), expect=2)
    assert "/checkpoints/step-" in err and "has shape [128, 64] but the config needs [96, 64]" in err, err
    assert err.strip().count("\n") == 0, err


def test_a_resume_from_a_folder_that_is_no_checkpoint_is_refused(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _, err = loom(*train_args(data, tmp_path, "r", 2, 0, **{"checkpoint.resume": empty}), expect=2)
    assert str(empty) in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_dataset_with_more_tokens_than_the_model_has_embeddings_is_refused(data, tmp_path):
    _, err = loom(*train_args(data, tmp_path, "v", 2, 0, **{"model.vocab_size": 256}), expect=2)
    assert "vocab_size 512 exceeds model.vocab_size 256" in err, err


def test_a_run_folder_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    _, err = loom(*train_args(data, tmp_path / "afile", "x", 2, 0), expect=2)
    assert "afile" in err, err


def test_loss_spike_rollback_without_checkpoints_is_refused(data, tmp_path):
    _, err = loom(*train_args(data, tmp_path, "s", 2, 0, **{"optimizer.loss_spike_policy": "rollback",
                                                          "checkpoint.enabled": "false"}), expect=2)
    assert "optimizer.loss_spike_policy" in err and "checkpoint.enabled" in err, err
    _, err = loom(*train_args(data, tmp_path, "s", 2, 0, **{"optimizer.loss_spike_policy": "skip",
                                                          "optimizer.loss_spike_factor": 0.5}), expect=2)
    assert "optimizer.loss_spike_factor" in err, err


def test_a_damaged_loss_spike_record_is_refused_naming_it(data, tmp_path):
    record = tmp_path / "s" / "loss_spikes.json"
    record.parent.mkdir()
    record.write_text('{"rollbacks": [{"step": 3')
    _, err = loom(*train_args(data, tmp_path, "s", 2, 0, **{"optimizer.loss_spike_policy": "rollback"}), expect=2)
    assert str(record) in err, err


def test_negative_max_restarts_is_refused(data, tmp_path):
    args = train_args(data, tmp_path, "m", 2, 0)
    _, err = loom("launch", *args[1:], "--max-restarts=-1", expect=2)
    assert "--max-restarts -1" in err, err
