"""loom's CUDA part (Note [the CUDA part] in util/cuda_part.h), seen from outside.

A loom binary links no CUDA library: on a machine without an NVIDIA driver
neither `loom inspect` nor a CPU training run on two ranks loads
libtorch_cuda (the dynamic linker's own log says what each process loaded),
while `loom version` in a CUDA build loads the part from beside the binary
and reports the CUDA runtime, NCCL and the device count through it.

LOOM_BIN names the loom binary (default build/loom).
"""
import ctypes
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "interop"))
from conftest import LOOM_BIN  # noqa: E402  (interop helpers: the binary's path)

TINY = REPO / "configs" / "tiny.yaml"
DATASET_TOOL = os.environ.get("LOOM_DATASET_TOOL", str(Path(LOOM_BIN).parent / "tests" / "loom_dataset_tool"))


def nvidia_driver_present():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def loaded_libraries(args, tmp_path, launcher=()):
    """Runs loom under LD_DEBUG=files; returns (completed process, {pid: set of library paths it loaded})."""
    log = tmp_path / "ld"
    env = dict(os.environ, OMP_NUM_THREADS="1", LD_DEBUG="files", LD_DEBUG_OUTPUT=str(log))
    proc = subprocess.run([*launcher, LOOM_BIN, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)
    loaded = {}
    for path in tmp_path.glob("ld.*"):
        names = set()
        # "generating link map": the library is mapped (a dlopen with
        # RTLD_NOLOAD that finds nothing logs only "dynamically loaded by").
        for line in path.read_text(errors="replace").splitlines():
            match = re.search(r"file=(\S+)\s+\[\d+\];\s+generating link map", line)
            if match:
                names.add(match.group(1))
        loaded[path.suffix[1:]] = names
    return proc, loaded


def loads(names, library):
    return any(Path(name).name == library for name in names)


def cuda_build():
    out = subprocess.run([LOOM_BIN, "version"], capture_output=True, text=True, timeout=120, check=True).stdout
    return "cuda not built" not in out


@pytest.mark.skipif(nvidia_driver_present(), reason="with an NVIDIA driver the part loads as loom starts")
def test_inspect_loads_no_cuda_library(tmp_path):
    proc, loaded = loaded_libraries(["inspect", TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert loaded, "LD_DEBUG wrote no log"
    for pid, names in loaded.items():
        assert loads(names, "libtorch_cpu.so"), (pid, sorted(names))
        # (libtorch_cpu itself needs the CUDA runtime and CUPTI.)
        for library in ("libtorch_cuda.so", "libloom_cuda.so", "libc10_cuda.so", "libnccl.so.2", "libcublas.so.13",
                        "libcudnn.so.9"):
            assert not loads(names, library), (pid, library, sorted(names))


@pytest.mark.skipif(nvidia_driver_present(), reason="with an NVIDIA driver the part loads as loom starts")
def test_a_cpu_run_on_two_ranks_with_device_auto_loads_no_cuda_library(tmp_path):
    data = tmp_path / "data"
    rng = random.Random(5)
    lines = [" ".join(str(rng.randrange(1, 512)) for _ in range(rng.randint(80, 200))) for _ in range(40)]
    subprocess.run([DATASET_TOOL, "write", str(data), "--vocab-size", "512", "--eos", "0"],
                   input="\n".join(lines) + "\n", text=True, check=True, capture_output=True)
    sets = {"run.output_dir": tmp_path / "runs", "run.name": "cpu", "run.device": "auto", "data.train": f"[{data}]",
            "data.tokenizer": "", "model.vocab_size": 512, "model.hidden_size": 64, "model.intermediate_size": 128,
            "model.num_layers": 2, "data.seq_len": 32, "model.max_seq_len": 32, "batch.global_batch_size": 4,
            "schedule.train_steps": 2, "schedule.warmup_steps": 1, "checkpoint.enabled": "false",
            "checkpoint.export_hf_at_end": "false", "parallel.dp": 2}
    args = ["train", TINY]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    logs = tmp_path / "logs"
    logs.mkdir()
    proc, loaded = loaded_libraries(args, logs, launcher=("mpirun", "--allow-run-as-root", "--oversubscribe",
                                                          "-np", "2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [names for names in loaded.values() if loads(names, "libtorch_cpu.so")]
    assert len(ranks) == 2, {pid: sorted(names) for pid, names in loaded.items()}
    for names in ranks:
        assert not loads(names, "libtorch_cuda.so"), sorted(names)
        assert not loads(names, "libloom_cuda.so"), sorted(names)


def test_version_loads_the_cuda_part_beside_the_binary_and_reports_through_it(tmp_path):
    proc, loaded = loaded_libraries(["version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    versions = dict(line.split(" ", 1) for line in proc.stdout.splitlines()[1:])
    if not cuda_build():
        assert versions["cuda"] == "not built", proc.stdout
        return
    assert "cuda" not in versions, proc.stdout  # the part loaded: no failure reported
    assert re.fullmatch(r"\d+\.\d+", versions["cuda_runtime"]), proc.stdout
    assert re.fullmatch(r"\d+\.\d+\.\d+", versions["nccl"]), proc.stdout
    assert re.match(r"\d+", versions["cuda_devices"]), proc.stdout
    (names,) = loaded.values()
    part = [name for name in names if Path(name).name == "libloom_cuda.so"]
    assert part == [str(Path(LOOM_BIN).resolve().parent / "libloom_cuda.so")], sorted(names)
    assert loads(names, "libtorch_cuda.so"), sorted(names)
