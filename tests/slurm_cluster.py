"""A real one-node SLURM cluster, started for a test and stopped by PID afterwards.

Why not a mock: the SLURM profile is only worth anything if `sbatch`, `sacct` and the
Snakemake executor plugin really agree with it. Debian's packages (installed by
`make slurm`) give us the daemons; there is no systemd, so this module starts each one
itself, in the foreground, with every file (configs, state, logs, sockets, database) in a
private directory and free TCP ports, so it touches no system service and two runs
cannot collide. It needs root (the daemons run as root, munged as user `munge`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sacct", "sacctmgr", "squeue", "scontrol", "sinfo")
CLUSTER = "abltest"
ACCOUNT = "abliterate"


def unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "the SLURM test starts slurmctld/slurmd/slurmdbd/mariadbd itself and needs root"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (
            f"SLURM packages are not installed (missing {', '.join(missing)}); "
            "`make slurm` installs them on Debian as root"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user munge does not exist (Debian's munge package creates it)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """munged + mariadbd + slurmdbd + slurmctld + slurmd under `root`, one node.

    `env` is the environment a client (sbatch, sacct, snakemake) needs to talk to it.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self.env["PATH"] = f"{self.root / 'bin'}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"

    # ---- lifecycle ----
    def start(self, timeout: float = 60.0) -> SlurmCluster:
        try:
            self._start_munge(timeout)
            self._start_mariadb(timeout)
            self._start_slurmdbd(timeout)
            self._register_accounting()
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every daemon this object started, newest first, by its PID."""
        for _name, process in reversed(self.processes):  # slurmd first, munged last
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def logs(self, workdir: Path | None = None) -> str:
        """The daemons' (and `workdir`'s SLURM jobs') log tails: how far it got."""
        parts = []
        if workdir is not None:
            for path in sorted(Path(workdir).glob(".snakemake/slurm_logs/**/*.log")):
                parts.append(f"--- {path}\n{path.read_text(errors='replace')[-2000:]}")
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # ---- daemons ----
    def _spawn(self, name: str, command: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out.log", "ab")  # noqa: SIM115 (lives with the daemon)
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, **kwargs
        )
        log.close()
        self.processes.append((name, process))
        return process

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with status {process.returncode} while waiting for "
                        f"{what}\n{self.logs()}"
                    )
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{self.logs()}"
            )
        return result

    def _srun_keeping_our_config(self) -> None:
        """An `srun` first on PATH that is the real one with SLURM_CONF set again.

        Why: inside a job, the executor plugin's jobstep runs the rule through a nested
        `srun` and strips every SLURM_* variable from its environment, SLURM_CONF too. On
        a real cluster srun then reads /etc/slurm/slurm.conf; this private cluster's
        config lives elsewhere (so that the test touches nothing of the system's).
        """
        shim = self.root / "bin" / "srun"
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_text(
            f'#!/bin/sh\nSLURM_CONF={self.root / "slurm.conf"} exec {_which("srun")} "$@"\n'
        )
        shim.chmod(0o755)

    def _start_munge(self, timeout: float) -> None:
        munge = pwd.getpwnam("munge")
        for sub in ("log", "munge", "state", "spool", "db"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._srun_keeping_our_config()
        os.chmod(self.root, 0o755)
        directory = self.root / "munge"
        os.chown(directory, munge.pw_uid, munge.pw_gid)
        os.chmod(directory, 0o755)  # clients need to reach the socket
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        self.munge_socket = directory / "munge.socket"
        self._spawn(
            "munged",
            [
                "runuser", "-u", "munge", "--", _which("munged"), "--foreground",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={directory / 'munged.pid'}", f"--log-file={directory / 'munged.log'}",
                f"--seed-file={directory / 'munged.seed'}",
            ],
        )  # fmt: skip
        self._wait("munged's socket", self.munge_socket.exists, timeout)

    def _start_mariadb(self, timeout: float) -> None:
        datadir = self.root / "db"
        self._run(
            _which("mariadb-install-db"), f"--datadir={datadir}", "--user=root",
            "--auth-root-authentication-method=socket", "--skip-test-db",
        )  # fmt: skip
        self.db_port = _free_port()
        self.db_socket = self.root / "db" / "mysqld.sock"
        self._spawn(
            "mariadbd",
            [
                _which("mariadbd"), "--no-defaults", f"--datadir={datadir}", "--user=root",
                f"--socket={self.db_socket}", f"--port={self.db_port}", "--bind-address=127.0.0.1",
                f"--pid-file={self.root / 'db' / 'mariadbd.pid'}", "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900",
                f"--log-error={self.root / 'log' / 'mariadbd.log'}",
            ],
        )  # fmt: skip
        self._wait("mariadbd's socket", self.db_socket.exists, timeout)
        sql = (
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )
        self._run("mariadb", f"--socket={self.db_socket}", "-u", "root", "-e", sql)

    def _start_slurmdbd(self, timeout: float) -> None:
        self.dbd_port = _free_port()
        conf = self.root / "slurmdbd.conf"
        conf.write_text(
            f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
            f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"LogFile={self.root / 'log' / 'slurmdbd.log'}\nPidFile={self.root / 'slurmdbd.pid'}\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={self.db_port}\nStorageUser=slurm\nStoragePass=slurm\n"
            "StorageLoc=slurm_acct_db\n"
        )
        os.chmod(conf, 0o600)
        self._write_slurm_conf()
        # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait(
            "slurmdbd",
            lambda: self._run("sacctmgr", "-n", "list", "cluster", check=False).returncode == 0,
            timeout,
        )

    def _register_accounting(self) -> None:
        """The cluster, an account and this user, so sacct can report our jobs."""
        user = pwd.getpwuid(os.geteuid()).pw_name
        self._run("sacctmgr", "-i", "add", "cluster", CLUSTER)
        self._run("sacctmgr", "-i", "add", "account", ACCOUNT, f"Cluster={CLUSTER}")
        self._run("sacctmgr", "-i", "add", "user", user, f"Account={ACCOUNT}", f"Cluster={CLUSTER}")

    def _write_slurm_conf(self) -> None:
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        # The node declares 16 CPUs whatever the machine has (config_overrides): jobs ask
        # for the profile's cpus_per_task, and the test is about submission, not speed.
        (self.root / "slurm.conf").write_text(
            f"ClusterName={CLUSTER}\nSlurmctldHost={self.host}(127.0.0.1)\n"
            f"SlurmctldPort={self.ctld_port}\nSlurmdPort={self.slurmd_port}\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
            f"StateSaveLocation={self.root / 'state'}\nSlurmdSpoolDir={self.root / 'spool'}\n"
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={self.root / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}\n"
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "JobAcctGatherType=jobacct_gather/none\nMpiDefault=none\n"
            "SchedulerType=sched/builtin\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_CPU\nSlurmdParameters=config_overrides\n"
            "ReturnToService=2\nMinJobAge=300\nSlurmdTimeout=60\n"
            "AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\nAccountingStoragePort={self.dbd_port}\n"
            # for slurmdbd connections this names the munge socket (slurm.conf(5))
            f"AccountingStoragePass={self.munge_socket}\n"
            "JobCompType=jobcomp/none\n"
            # the plugin names each job's rule in --comment; keep it for sacct
            "AccountingStoreFlags=job_comment\n"
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs=16 RealMemory={memory} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
        )

    def _start_slurm(self, timeout: float) -> None:
        conf = str(self.root / "slurm.conf")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", conf])
        self._wait(
            "slurmctld", lambda: self._run("scontrol", "ping", check=False).returncode == 0, timeout
        )
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", conf])

        def node_idle() -> bool:
            out = self._run("sinfo", "-h", "-o", "%T", check=False).stdout
            return out.strip().startswith("idle")

        self._wait("the node to be idle", node_idle, timeout)
