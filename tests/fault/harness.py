"""A genq deployment the fault tests can break: its own Redis, database and (when asked) its own
PostgreSQL cluster and SeaweedFS, with `genq api` and `genq worker` subprocesses in their own process
groups. Short leases, heartbeats and reaper intervals make every recovery take seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psycopg
import redis

from tests.e2e.conftest import API_KEY, TINY, Stack, genq, kill_group, server_env, start
from tests.services import S3Server, free_port, weed_binary

# Recovery in seconds: a dead worker's lease expires in 3 s, the reaper looks every 0.5 s, a queued
# shard with no message is re-sent after 2 s, a stuck finalization is redone after 3 s.
FAULT_ENV = {
    "GENQ_DEVICE": "cpu",
    "GENQ_SHARD_SIZE": "8",
    "GENQ_MAX_BATCH_SIZE": "4",  # results land a few at a time, so a fault comes mid-shard
    "GENQ_WORKER_SHARDS": "1",
    "GENQ_LEASE_SECONDS": "3",
    "GENQ_HEARTBEAT_SECONDS": "0.5",
    "GENQ_REAPER_INTERVAL_SECONDS": "0.5",
    "GENQ_QUEUED_REDISPATCH_SECONDS": "2",
    "GENQ_FINALIZING_STALE_SECONDS": "3",
    "GENQ_VISIBILITY_TIMEOUT_SECONDS": "30",
    "GENQ_WORKER_SOFT_SHUTDOWN_SECONDS": "2",
}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1, on_timeout=lambda: ""):
    """predicate()'s first truthy value, polling; AssertionError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # a service mid-restart: keep polling
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server on its own port: stop, restart empty, flush."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.root = root
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: redis.Redis.from_url(self.url).ping(), 20, "redis-server to start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def flush(self) -> None:
        redis.Redis.from_url(self.url).flushall()


class PostgresCluster:
    """A private PostgreSQL cluster (initdb + pg_ctl) on its own port and data directory, so a restart
    never touches the machine's shared server."""

    def __init__(self) -> None:
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1])
        self.port = free_port()
        # Outside pytest's tmp dirs (0700, root's): the server runs as the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="genq-fault-pg-"))
        self.root.chmod(0o777)
        self.data = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self._as_owner([self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync"])
        self.start()
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "genq"')

    @property
    def _admin(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/genq"

    def _as_owner(self, args: list) -> None:
        # initdb and pg_ctl refuse to run as root: run them as the postgres user when we are root.
        argv = [str(a) for a in args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_owner([self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-o",
                        f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off", "start"])

    def stop(self) -> None:
        self._as_owner([self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class SeaweedS3:
    """A private SeaweedFS S3 server that can be stopped and started again on the same ports and data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = {name: free_port() for name in (
            "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "iam.port", "debug.port")}
        self.bucket = "genq-fault"
        self.process: subprocess.Popen | None = None
        self.start()
        wait_for(lambda: self.client().create_bucket(Bucket=self.bucket) or True, 60, "SeaweedFS to start", 0.5)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def server(self) -> S3Server:
        return S3Server(self.endpoint_url, self.bucket, "genq-test", "genq-test-secret", self.process)

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id="genq-test",
                            aws_secret_access_key="genq-test-secret", region_name="us-east-1")

    def start(self) -> None:
        args = [weed_binary(), "server", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-s3", "-volume.max=0", "-master.volumeSizeLimitMB=64",
                "-s3.port.iceberg=0", "-s3.port.lance=0", *[f"-{n}={p}" for n, p in self.ports.items()]]
        log = (self.root / "weed.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        wait_for(lambda: self.client().head_bucket(Bucket=self.bucket) or True, 60, "SeaweedFS to serve again", 0.5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class Deployment(Stack):
    """A Stack with its own services; `workers` maps a name to its running `genq worker`."""

    redis: RedisServer | None = None
    postgres: PostgresCluster | None = None
    s3: SeaweedS3 | None = None
    api: subprocess.Popen | None = None
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_api(self) -> None:
        self.api = start(genq("api"), self.env, self.logs / "api.log")
        self.processes.append(self.api)
        wait_for(lambda: self.client().models.list(), 60, "the API to answer", 0.3, self.log_tail)

    def start_worker(self, name: str, *extra: str, script: Path | None = None) -> subprocess.Popen:
        args = genq("worker", "--models", TINY, "-c", "1", "-n", f"{name}@%h", *extra)
        if script is not None:  # a harness around `genq worker` (the poison test's crash injection)
            args = [sys.executable, str(script), *args[3:]]
        log = self.logs / f"worker-{name}.log"
        process = start(args, self.env, log)
        self.workers[name] = process
        self.processes.append(process)
        return process

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends sig to the whole process group (parent, pool child and its reaper)."""
        os.killpg(self.workers[name].pid, sig)

    def kill_api(self) -> None:
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait(timeout=10)

    def close(self) -> None:
        for process in self.processes:
            kill_group(process, grace=5)
        for service in (self.redis,):
            if service is not None:
                service.stop()
        if self.s3 is not None:
            self.s3.stop()
        if self.postgres is not None:
            self.postgres.destroy()


def new_deployment(root: Path, *, database_url: str | None, s3_server: S3Server | None, private_postgres: bool,
                   private_s3: bool, env: dict[str, str], models_file: Path) -> Deployment:
    """Starts the services (not the API or workers) of one fault test's deployment."""
    (root / "s3").mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(root)
    postgres = PostgresCluster() if private_postgres else None
    if postgres is not None:
        from db.migrate import upgrade_to_head

        database_url = postgres.url
        upgrade_to_head(database_url)
    s3 = SeaweedS3(root / "s3") if private_s3 else None
    store = s3.server() if s3 is not None else s3_server
    port = free_port()
    full_env = {**server_env(database_url, redis_server.url, store, root / "home", port), **FAULT_ENV,
                "GENQ_MODELS_FILE": str(models_file), **env}
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    return Deployment(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, database_url=database_url,
                      env=full_env, logs=logs, redis=redis_server, postgres=postgres, s3=s3)


