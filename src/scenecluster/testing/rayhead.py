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
import warnings
from pathlib import Path
from typing import Any

from scenecluster.testing.s3server import free_ports

_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


class LocalRayHead:
    """``ray start --head`` on 127.0.0.1 with ``num_cpus`` CPUs; a context manager.

    Attributes
    ----------
    dashboard_url : str
        The job server address for ``ray job submit --address``.
    """

    def __init__(self, num_cpus: int = 2, *, startup_timeout: float = 90.0, multi_node: bool = False) -> None:
        self.num_cpus = num_cpus
        self.multi_node = multi_node
        # With multi-node allowed, Ray replaces the literal 127.0.0.1 (and localhost) by the machine's network
        # address, but leaves other loopback addresses alone: a head that takes a second node listens on 127.0.0.2
        # and the node on 127.0.0.3, so the cluster stays on loopback. The dashboard stays on 127.0.0.1.
        self.node_ip = "127.0.0.2" if multi_node else "127.0.0.1"
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(32)
        self.ports: dict[str, int] = {}
        self.worker_ports: tuple[int, int] = (0, 0)  # the range its worker processes listen in
        self.temp_dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.ports['port']}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the head and for ``ray job`` commands: loopback, token auth, this venv first."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        env.update(
            {
                # "0" keeps a one-node cluster on 127.0.0.1, and refuses a second node
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if self.multi_node else "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        return env

    def ray(self, *args: str, timeout: float = 120.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a ``ray`` CLI command against this head (``ray job ...``), capturing its output."""
        return subprocess.run(
            [self._ray_bin(), *args], env=self.env(), capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def submit_job(
        self, job_id: str, working_dir: str | Path, entrypoint: list[str], *, env_vars: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """``ray job submit`` of ``entrypoint`` with ``working_dir`` uploaded (less git, virtual environments and
        caches) and ``env_vars`` set for the job, waiting for it to end, as a user launches a job."""
        runtime_env = {"env_vars": env_vars, "excludes": [".git", ".venv", "**/__pycache__", "*.egg-info"]}
        return self.ray(
            "job",
            "submit",
            "--address",
            self.dashboard_url,
            "--submission-id",
            job_id,
            "--working-dir",
            str(working_dir),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
            timeout=timeout,
        )

    def job_info(self, job_id: str) -> dict[str, Any]:
        """The job server's record of ``job_id`` (``status`` is ``SUCCEEDED``, ``FAILED``, ...)."""
        req = urllib.request.Request(
            f"{self.dashboard_url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    @staticmethod
    def _ray_bin() -> str:
        beside = Path(sys.executable).parent / "ray"
        return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")

    def start(self, attempts: int = 2) -> LocalRayHead:
        """Start it and wait until it is ready; a start that fails is retried with new ports and temp dir.

        Why retry: on a loaded 2-core machine ``ray start`` of a joining node once gave up after its own 30 s wait
        for the raylet to register ("The current node timed out during startup"), and a free port can be taken
        between choosing it and Ray binding it. Neither is what a test checks. The failed start's logs (``ray
        start``'s and the raylet's) are kept in a warning, and in the error when the last attempt fails too.
        """
        failures: list[str] = []
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except (RuntimeError, TimeoutError) as exc:
                failures.append(f"attempt {attempt}: {exc}")
                if attempt == attempts:
                    raise type(exc)("\n\n".join(failures)) from exc
                warnings.warn(f"{type(self).__name__} did not start, retrying once: {exc}", stacklevel=2)
        return self  # not reached: the last attempt returns or raises

    def _start_once(self) -> None:
        # Short: Ray puts unix sockets under it, and their paths are limited to about 100 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh-", dir="/tmp"))
        cmd = self._command()
        self._log = open(self.temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            cmd, env=self.env(), stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            raylet = self.raylet_log_tail()  # before stop() removes the temp dir
            self.stop()
            raise type(exc)(f"{exc}\n{raylet}") from exc
        except BaseException:
            self.stop()
            raise

    def _command(self) -> list[str]:
        ports = free_ports(len(_PORT_FLAGS) + 1)
        self.ports = dict(zip(_PORT_FLAGS, ports, strict=False))
        worker_lo = _worker_range_start(ports[-1])
        self.worker_ports = (worker_lo, worker_lo + 999)
        return [
            self._ray_bin(),
            "start",
            "--head",
            "--block",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--node-ip-address={self.node_ip}",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}",
            f"--min-worker-port={worker_lo}",
            f"--max-worker-port={worker_lo + 999}",
            *(f"--{flag}={port}" for flag, port in self.ports.items()),
        ]

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The alive nodes from Ray's state API (``/api/v0/nodes``): ``node_id``, ``resources_total``, ..."""
        req = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=1000&detail=true",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            nodes = json.loads(resp.read())["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{self.log_tail()}")
            req = urllib.request.Request(
                self.dashboard_url + "/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray head not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        return (_tail(self.temp_dir / "ray-start.log", n) if self.temp_dir else None) or "(no log)"

    def raylet_log_tail(self, n: int = 15) -> str:
        """The last ``n`` lines of each of the raylet's logs: why a node did not register, where ``ray start``'s own
        log says only that it timed out."""
        logs = sorted((self.temp_dir / "session_latest" / "logs").glob("raylet.*")) if self.temp_dir else []
        tails = [f"--- {log.name}:\n{tail}" for log in logs if (tail := _tail(log, n)) is not None]
        return "\n".join(tails) or "(no raylet log)"

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

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM the head's process group, give it ``grace`` seconds, SIGKILL what is left, remove the temp dir.

        Ray's processes seldom all exit on SIGTERM within seconds, and this throwaway cluster keeps nothing, so the
        grace is short: each head and node stopped cost the tests 5 s before.

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


def _tail(path: Path, n: int) -> str | None:
    """The last ``n`` lines of a log file, or None when it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return None


def _worker_range_start(seed: int) -> int:
    """Start of a thousand worker ports below the kernel's ephemeral range, with room for a second node's.

    The other ports are free ones the kernel hands out from its ephemeral range (32768 up by default); a
    worker range inside that range once contained the node manager's port and ``ray start`` refused to run.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    slots = max(1, (low - 12000) // 1000)  # 10000 .. low - 2000, each slot followed by the node's thousand
    return 10000 + (seed % slots) * 1000


# Ports a node that joins a cluster opens (the GCS, dashboard and client ports are the head's alone).
_NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


class LocalRayNode(LocalRayHead):
    """A second Ray node on this machine, ``ray start --address`` joined to a :class:`LocalRayHead`; a context
    manager. It has its own CPUs, custom ``resources`` (so tests can tell its work from the head's), ports and
    temp dir, uses the head's token, and is stopped the same way: its own process group, never ``ray stop``.
    """

    def __init__(
        self,
        head: LocalRayHead,
        num_cpus: int = 1,
        *,
        resources: dict[str, float] | None = None,
        startup_timeout: float = 90.0,
    ) -> None:
        if not head.multi_node:
            raise ValueError("a second node needs its head started with LocalRayHead(multi_node=True)")
        super().__init__(num_cpus, startup_timeout=startup_timeout, multi_node=True)
        self.head = head
        self.node_ip = "127.0.0.3"
        self.token = head.token
        self.resources = dict(resources or {})
        self.node_id: str | None = None

    @property
    def dashboard_url(self) -> str:
        return self.head.dashboard_url

    def _command(self) -> list[str]:
        self.ports = dict(zip(_NODE_PORT_FLAGS, free_ports(len(_NODE_PORT_FLAGS)), strict=True))
        head_lo = self.head.worker_ports[0]  # the next thousand ports, so the two nodes' workers never collide
        worker_lo = head_lo + 1000  # still below the ephemeral range: _worker_range_start leaves room
        self.worker_ports = (worker_lo, worker_lo + 999)
        return [
            self._ray_bin(),
            "start",
            f"--address={self.head.gcs_address}",
            "--block",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            f"--node-ip-address={self.node_ip}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--min-worker-port={worker_lo}",
            f"--max-worker-port={worker_lo + 999}",
            *(f"--{flag}={port}" for flag, port in self.ports.items()),
        ]

    def _wait_ready(self) -> None:
        """Until the head's state API lists an alive node holding this node's custom resources."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                mine = [
                    n
                    for n in self.head.alive_nodes()
                    if n["node_id"] != self._head_node_id()
                    and all(n.get("resources_total", {}).get(k) == v for k, v in self.resources.items())
                ]
            except OSError:
                mine = []
            if mine:
                self.node_id = mine[0]["node_id"]
                return
            time.sleep(0.5)
        raise TimeoutError(f"Ray node not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def _head_node_id(self) -> str | None:
        heads = [n["node_id"] for n in self.head.alive_nodes() if n.get("is_head_node")]
        return heads[0] if heads else None
