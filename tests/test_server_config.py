"""Server mode refuses, at start, configuration that would silently lose or split work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO

NO_AWS = {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true"}


def genq(args: list[str], env: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "genq.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**clean, **NO_AWS, "GENQ_HOME": str(tmp_path), **env})


@pytest.mark.parametrize("command", [["api"], ["worker", "--no-reaper"], ["reaper", "--once"]])
def test_broker_without_database_url_is_a_start_up_error(command, tmp_path) -> None:
    done = genq(command, {"GENQ_BROKER_URL": "redis://127.0.0.1:6379/9"}, tmp_path)
    assert done.returncode == 1 and "GENQ_DATABASE_URL is not" in done.stdout + done.stderr


@pytest.mark.parametrize("command", [["api"], ["reaper", "--once"]])
def test_s3_store_without_credentials_is_a_start_up_error(command, tmp_path) -> None:
    done = genq(command, {"GENQ_STORAGE_URL": "s3://bucket/genq", "GENQ_DATABASE_URL": "sqlite:///x.db"}, tmp_path)
    assert done.returncode == 1 and "no S3 credentials" in done.stdout + done.stderr


def test_a_complete_configuration_starts(tmp_path) -> None:
    env = {"GENQ_STORAGE_URL": "s3://bucket/genq", "GENQ_DATABASE_URL": f"sqlite:///{tmp_path / 'g.db'}",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    done = genq(["migrate"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    done = genq(["reaper", "--once"], env, tmp_path)
    assert "configuration error" not in done.stdout + done.stderr
