"""A real one-node Slurm cluster on localhost, for the launch tests.

Follows ../shared/ENVIRONMENT.md ("A real one-node Slurm cluster on localhost"):
munged with the key in /etc/munge/munge.key, slurmctld and slurmd in the
foreground with a slurm.conf, state, spool, logs and pid files in a temp
folder, a node with more CPUs than the machine has (SlurmdParameters=
config_overrides) and a partition with OverSubscribe=FORCE, free ports so
nothing else on the machine is disturbed. Clients find it through SLURM_CONF
(LocalSlurmCluster.env). Only the daemons this module started are stopped.

    with LocalSlurmCluster(tmp_dir) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Run alone (`python tests/e2e/slurm_cluster.py`) it starts the cluster, prints
sinfo and stops it.
"""
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")


def missing_programs():
    """The Slurm and munge programs not on PATH (nor in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in DAEMONS if shutil.which(p, path=path) is None]


def why_unavailable():
    """A reason the cluster cannot run here, or None."""
    missing = missing_programs()
    if missing:
        return f"Slurm/munge programs missing: {', '.join(missing)} (launch/setup.sh installs slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root here (SlurmUser=root, munged's key and socket)"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name):
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class LocalSlurmCluster:
    def __init__(self, folder, cpus=8, start_timeout=60):
        self.folder = Path(folder)
        self.cpus = cpus
        self.start_timeout = start_timeout
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._started = []  # (name, Popen) of the daemons this object started

    # -- munge ------------------------------------------------------------
    def _munge_works(self):
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self):
        if self._munge_works():
            return  # someone else's munged: use it, leave it running
        munge_user = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(128))
        os.chown(MUNGE_KEY, munge_user.pw_uid, munge_user.pw_gid)
        os.chmod(MUNGE_KEY, 0o400)
        for d in (MUNGE_SOCKET_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, munge_user.pw_uid, munge_user.pw_gid)
        # In the foreground (-F) as the munge user, so this object owns the process.
        proc = subprocess.Popen(["runuser", "-u", "munge", "--", _sbin("munged"), "-F"],
                                stdout=subprocess.DEVNULL, stderr=open(self.folder / "munged.log", "w"),
                                start_new_session=True)
        self._started.append(("munged", proc))
        self._wait(self._munge_works, "munged to answer", proc)

    # -- slurm ------------------------------------------------------------
    def _write_conf(self):
        for d in ("state", "spool", "log"):
            (self.folder / d).mkdir(parents=True, exist_ok=True)
        f = self.folder
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024) // 2
        self.conf.write_text(f"""\
ClusterName=loomtest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Try pending jobs every second (default 60): a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=1
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=3600
SlurmdParameters=config_overrides
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")

    def _node_idle(self):
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env,
                             timeout=10)
        return out.returncode == 0 and out.stdout.strip().rstrip("*") == "idle"

    def _wait(self, condition, what, *procs):
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if condition():
                return
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: the daemon exited with {proc.returncode}; logs in {self.folder}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.folder}")

    def start(self):
        try:
            self._start_munge()
            self._write_conf()
            ctld = subprocess.Popen([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=self.env,
                                    stdout=subprocess.DEVNULL, stderr=open(self.folder / "slurmctld.err", "w"),
                                    start_new_session=True)
            self._started.append(("slurmctld", ctld))
            self._wait(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, env=self.env,
                                              timeout=10).returncode == 0, "slurmctld to answer", ctld)
            slurmd = subprocess.Popen([_sbin("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)], env=self.env,
                                      stdout=subprocess.DEVNULL, stderr=open(self.folder / "slurmd.err", "w"),
                                      start_new_session=True)
            self._started.append(("slurmd", slurmd))
            self._wait(self._node_idle, "the node to be idle in sinfo", ctld, slurmd)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        """Stops the daemons this object started, last first (jobs die with slurmd)."""
        if any(name == "slurmctld" for name, _ in self._started):
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=10)
        for name, proc in reversed(self._started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self._started.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- queries ----------------------------------------------------------
    def job_field(self, job_id, field):
        """A field of `scontrol show job` (e.g. JobState, Restarts, ExitCode), or None."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                             env=self.env, timeout=10).stdout
        for item in out.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return None


if __name__ == "__main__":
    reason = why_unavailable()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory(prefix="loom-slurm-") as folder:
        with LocalSlurmCluster(folder) as cluster:
            print(subprocess.run(["sinfo"], capture_output=True, text=True, env=cluster.env).stdout)
            if len(sys.argv) > 1:
                subprocess.run(sys.argv[1:], env=cluster.env)
