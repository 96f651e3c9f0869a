"""Running `loom train` from the interop tests, on one rank or under mpirun
(one rank a core at most: OMP_NUM_THREADS=1)."""
import os
import shutil
import subprocess

from conftest import LOOM_BIN


def mpi_prefix(ranks):
    """The mpirun command line that starts `ranks` processes, or nothing for one."""
    if ranks == 1:
        return []
    args = [shutil.which("mpirun") or "mpirun", "--oversubscribe", "-np", str(ranks)]
    if os.geteuid() == 0:
        args.insert(1, "--allow-run-as-root")
    return args


def run_train(config, ranks=1, sets=None, timeout=300):
    """`loom train CONFIG --set KEY=VALUE...` on `ranks` ranks; asserts it succeeded, returns the process."""
    args = [*mpi_prefix(ranks), LOOM_BIN, "train", str(config)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{' '.join(args)}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc
