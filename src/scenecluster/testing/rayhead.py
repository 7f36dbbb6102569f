"""A throwaway single-node Ray head (``ray start --head --block``) for job-submission tests and demos.

Every port Ray opens is moved to a free one and the session lives in its own ``--temp-dir``, so the head
never collides with another Ray on the machine (a test's in-process ``ray.init()``, a colleague's
cluster). It is stopped by signalling the process group it was started in, never with ``ray stop``,
which would stop *every* Ray on the machine. Token authentication (on by default in Ray 2.60) uses a
random ``RAY_AUTH_TOKEN`` given to the head and to every ``ray job`` command through :meth:`env`,
so ``~/.ray/auth_token`` is neither read nor written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from scenecluster.testing.s3server import free_ports

_PORT_FLAGS = (
    "port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port",
    "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
)


class LocalRayHead:
    """``ray start --head`` on 127.0.0.1 with ``num_cpus`` CPUs; a context manager.

    Attributes
    ----------
    dashboard_url : str
        The job server address for ``ray job submit --address``.
    """

    def __init__(self, num_cpus: int = 2, *, startup_timeout: float = 90.0) -> None:
        self.num_cpus = num_cpus
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(32)
        self.ports: dict[str, int] = {}
        self.temp_dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['port']}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the head and for ``ray job`` commands: loopback, token auth, this venv first."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        env.update({
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep a one-node cluster on 127.0.0.1
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        })
        return env

    def ray(self, *args: str, timeout: float = 120.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a ``ray`` CLI command against this head (``ray job ...``), capturing its output."""
        return subprocess.run([self._ray_bin(), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, **kwargs)

    def job_info(self, job_id: str) -> dict[str, Any]:
        """The job server's record of ``job_id`` (``status`` is ``SUCCEEDED``, ``FAILED``, ...)."""
        req = urllib.request.Request(f"{self.dashboard_url}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    @staticmethod
    def _ray_bin() -> str:
        beside = Path(sys.executable).parent / "ray"
        return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")

    def start(self) -> LocalRayHead:
        # Short: Ray puts unix sockets under it, and their paths are limited to about 100 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
        ports = free_ports(len(_PORT_FLAGS) + 1)
        self.ports = dict(zip(_PORT_FLAGS, ports, strict=False))
        worker_lo = 20000 + (ports[-1] % 20000)
        cmd = [
            self._ray_bin(), "start", "--head", "--block",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--disable-usage-stats", "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}",
            f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 999}",
            *(f"--{flag}={port}" for flag, port in self.ports.items()),
        ]
        self._log = open(self.temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(cmd, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{self.log_tail()}")
            req = urllib.request.Request(self.dashboard_url + "/api/jobs/",
                                         headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray head not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join((self.temp_dir / "ray-start.log").read_text(errors="replace").splitlines()[-n:])
        except (OSError, TypeError):
            return "(no log)"

    def _session_pids(self) -> list[int]:
        """Processes of this head: their command line names its unique temp dir (or they are in its group)."""
        pids = []
        marker = str(self.temp_dir).encode()
        pgid = self._proc.pid if self._proc else None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                in_group = pgid is not None and os.getpgid(int(entry.name)) == pgid
            except OSError:
                continue
            if marker in cmdline or in_group:
                pids.append(int(entry.name))
        return pids

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the head's process group, give it ``grace`` seconds, SIGKILL what is left, remove the temp dir.

        The processes are found by group and by the unique temp dir in their command line, so only this
        head's processes are signalled.
        """
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._session_pids() and time.monotonic() < deadline:
            time.sleep(0.25)
        for pid in self._session_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
