"""A real Slurm cluster (Debian's slurm-wlm + munge) on this one machine, for tests and local trials.

Why: `launch/slurm.sh` is only worth something if a real `sbatch` runs it across several nodes, with
Slurm's own signals and requeue. This module starts munged, slurmctld and N slurmd daemons that emulate
nodes node1..nodeN on 127.0.0.1, all owned by this Python process (foreground children), and stops
exactly those again. All traffic stays on loopback.

How the nodes are emulated: every slurmd gets its own port and runs in its own UTS + mount namespace
(`unshare`), with the hostname nodeK and a private /etc/hosts where node1..nodeN resolve to 127.0.0.1
(the system file is untouched). Jobs inherit that namespace, so `MASTER_ADDR=node1` works inside them.
The nodes share one network namespace: two nodes cannot bind the same port (one rendezvous per job is
fine). Each node advertises LOCAL_SLURM_CPUS (default: all) CPUs, so nodes oversubscribe the real cores.

Needs root (daemons, namespaces) and, when Slurm is missing, apt-get (`ensure_slurm` installs it).

    with LocalSlurm(workdir, nodes=2) as cluster:
        job = cluster.sbatch(["--nodes=2", "launch/slurm.sh", ...], env=...)
        info = cluster.wait_job(job, timeout=120)

    python -m tests.helpers.slurm_cluster [COMMAND ...]   # a shell (or COMMAND) with SLURM_CONF set; then down

Facts learned on slurm-wlm 22.05 (Debian 12): SlurmctldHost must be `hostname -s`; munged wants its
socket folder mode 0755 and owned by munge; `ip netns exec` breaks slurmd (it hides /sys/fs/cgroup);
"mpi/pmix_v4: can not load PMIx library" in the logs is harmless (so no `--mpi=pmix`).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel", "munged",
            "unshare", "mount")
PACKAGES = ("slurm-wlm", "munge", "util-linux", "mount")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, no apt-get, the install failed); the message says why."""


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


def ensure_slurm(install_timeout: float = 600) -> None:
    """Install slurm-wlm + munge with apt-get when a command is missing; raise SlurmUnavailable if we can't."""
    if sys.platform != "linux":
        raise SlurmUnavailable(f"the local Slurm cluster needs Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm cluster needs root (it starts munged/slurmctld/slurmd and "
                               "uses namespaces); run the tests as root, e.g. in CI or a container")
    missing = [c for c in COMMANDS if _which(c) is None]
    if not missing:
        return
    if _which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm commands {missing} are missing and there is no apt-get to install "
                               f"{' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update", "-qq"],
             ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]]
    for cmd in steps:
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=install_timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took longer than {install_timeout:.0f}s") from None
        if res.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({res.returncode}): {(res.stderr or res.stdout)[-800:]}")
    missing = [c for c in COMMANDS if _which(c) is None]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {missing} are still missing")


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (kept bound until all are chosen so they differ)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def parse_record(text: str) -> dict[str, str]:
    """`scontrol show job -o` output (KEY=VALUE separated by spaces) as a dict; values may not hold spaces,
    which is true for every field we read (JobState, Restarts, ExitCode, NodeList, ...)."""
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if sep:
            out.setdefault(key, value)
    return out


class LocalSlurm:
    """munged + slurmctld + `nodes` slurmd daemons under `workdir`; a context manager that always stops them."""

    def __init__(self, workdir: str | Path, nodes: int = 2, cpus: int | None = None, kill_wait: int = 30,
                 requeue_delay: int = 5):
        self.dir = Path(workdir)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus or int(os.environ.get("LOCAL_SLURM_CPUS", "0") or 0) or os.cpu_count() or 1
        self.kill_wait = kill_wait
        # AuthInfo's cred_expire: how long a requeued job waits before it may start (Slurm's default: 120 s)
        self.requeue_delay = requeue_delay
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_dir = self.dir / "munge"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []

    # -- environment for clients -------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + _SBIN
        env.update(extra or {})
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            out = res.stderr.strip() or res.stdout.strip()
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {out}")
        return res

    # -- start / stop --------------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        ensure_slurm()
        atexit.register(self.stop)
        self._write_config()
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: "is UP" in self.run("scontrol", "ping", check=False).stdout, timeout, "slurmctld")
        for name in self.nodes:
            (self.dir / "spool" / name).mkdir(parents=True, exist_ok=True)
            script = (f"mount --bind '{self.dir / 'etc' / 'hosts'}' /etc/hosts && hostname '{name}' && "
                      f"exec slurmd -D -f '{self.conf}' -N '{name}'")
            self._spawn(name, ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script])
        self._wait(self._all_idle, timeout, "idle nodes", nudge=self._resume_nodes)

    def stop(self) -> None:
        """Cancel every job of this cluster, wait for them to end, then stop the daemons we started."""
        if not self.procs:
            return
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                if self.run("squeue", "-h", "-o", "%A", check=False).stdout.split():
                    self.run("scancel", "--user", "root", check=False)
                    self._wait(lambda: not self.run("squeue", "-h", "-o", "%A", check=False).stdout.split(),
                               self.kill_wait + 30, "jobs to end")
            except Exception as err:  # noqa: BLE001 - the daemons must be stopped whatever happened
                print(f"[slurm_cluster] teardown: {err}", file=sys.stderr)
        order = [n for n in self.nodes if n in self.procs] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for f in self._logs:
            f.close()
        self._logs.clear()

    # -- jobs ---------------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> int:
        res = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd, capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        return parse_record(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def wait_job(self, job_id: int, timeout: float, until=None, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job has finished (or `until(record)` holds); on timeout cancel it and raise."""
        until = until or (lambda rec: rec.get("JobState") in FINISHED)
        deadline = time.monotonic() + timeout
        while True:
            rec = self.job(job_id)
            if until(rec):
                return rec
            if time.monotonic() > deadline:
                self.cancel(job_id)
                raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s (state {rec.get('JobState')}, "
                                   f"reason {rec.get('Reason')}); cancelled it")
            time.sleep(poll)

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id), check=False)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for p in sorted((self.dir / "log").glob("*.*")):
            parts.append(f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.dir / "log" / f"{name}.out", "w")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True, **kw)

    def _wait(self, predicate, timeout: float, what: str, nudge=None) -> None:
        deadline = time.monotonic() + timeout
        nudged = False
        while not predicate():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f}s:\n{self.log_tail()}")
            if nudge and not nudged and time.monotonic() > deadline - timeout / 2:
                nudge()
                nudged = True
            time.sleep(0.25)

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        idle = {line.split()[0] for line in out if line.strip().endswith(" idle")}
        return idle >= set(self.nodes)

    def _resume_nodes(self) -> None:
        self.run("scontrol", "update", f"NodeName={','.join(self.nodes)}", "State=RESUME", check=False)

    def _write_config(self) -> None:
        for sub in ("etc", "state", "log", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for p in (self.dir, self.dir / "etc", self.dir / "log"):
            p.chmod(0o755)
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        mem = 1000
        probe = subprocess.run(["slurmd", "-C"], env=self.env(), capture_output=True, text=True, timeout=30)
        for item in probe.stdout.split():
            if item.startswith("RealMemory="):
                mem = int(item.split("=", 1)[1])
        d = self.dir
        lines = [
            "ClusterName=local", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'munge.sock'},cred_expire={self.requeue_delay}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={d / 'state'}/slurmctld.pid", f"SlurmdPidFile={d / 'spool'}/%n/slurmd.pid",
            f"SlurmctldLogFile={d / 'log'}/slurmctld.log", f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SlurmdParameters=config_overrides",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2", "SlurmctldTimeout=30",
            # Random first job id: job-id-derived ports (launch/slurm.sh) differ between clusters that run at once.
            f"FirstJobId={random.randrange(1, 19000)}",
            "SlurmdTimeout=30", "InactiveLimit=0",
            "SchedulerParameters=sched_interval=1,bf_interval=1",  # start a requeued job as soon as it may
            f"KillWait={self.kill_wait}", "Waittime=0", "MinJobAge=600",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory={mem} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)
        tmp.replace(self.conf)
        hosts = [f"127.0.0.1 localhost {host}", "::1 localhost ip6-localhost ip6-loopback"]
        hosts += [f"127.0.0.1 {name}" for name in self.nodes]
        (d / "etc" / "hosts").write_text("\n".join(hosts) + "\n")
        (d / "etc" / "hosts").chmod(0o644)

    def _start_munge(self) -> None:
        import pwd

        ms = self.munge_dir
        ms.mkdir(parents=True, exist_ok=True)
        user = pwd.getpwnam("munge")
        key = ms / "munge.key"
        key.write_bytes(os.urandom(1024))
        for p in (ms, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        ms.chmod(0o755)
        key.chmod(0o600)
        self._spawn("munged", ["munged", "--foreground", f"--socket={ms / 'munge.sock'}", f"--key-file={key}",
                               f"--log-file={ms / 'munged.log'}", f"--pid-file={ms / 'munged.pid'}",
                               f"--seed-file={ms / 'munged.seed'}"],
                    user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        self._wait(lambda: (ms / "munge.sock").exists(), 20, "munged socket")


def main(argv: list[str]) -> int:
    """Bring a 2-node cluster up under a temp folder, run COMMAND (default: a shell) with SLURM_CONF set, stop it."""
    import tempfile

    cmd = argv or [os.environ.get("SHELL", "bash")]
    nodes = int(os.environ.get("LOCAL_SLURM_NODES", "2"))
    workdir = tempfile.mkdtemp(prefix="local-slurm-", dir="/tmp")
    with LocalSlurm(workdir, nodes=nodes) as cluster:
        print(f"[slurm_cluster] {nodes} nodes up; SLURM_CONF={cluster.conf}", file=sys.stderr)
        rc = subprocess.call(cmd, env=cluster.env())
    shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
