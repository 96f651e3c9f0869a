"""Runs a command and records the peak resident memory of it (and its
children), measured from outside: getrusage(RUSAGE_CHILDREN).ru_maxrss once
it has exited. Under mpirun each rank runs its own copy of this wrapper.

    mpirun -np 4 python peak_memory.py OUT_DIR -- loom train ...

writes OUT_DIR/rank-N.json ({"rank", "peak_bytes", "returncode"}), N from
OMPI_COMM_WORLD_RANK (0 without MPI), and exits with the command's code.
"""
import json
import os
import resource
import subprocess
import sys


def main():
    out_dir, separator, *command = sys.argv[1:]
    assert separator == "--", "usage: peak_memory.py OUT_DIR -- COMMAND..."
    returncode = subprocess.call(command)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "peak_bytes": peak_kib * 1024, "returncode": returncode}, f)
    sys.exit(returncode)


if __name__ == "__main__":
    main()
