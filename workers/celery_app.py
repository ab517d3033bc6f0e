"""The Celery app and its configuration, derived from Settings in one place; no tasks, no torch.

Workers start it as `celery -A workers.celery_app worker` (or `genq worker`); the API and the reaper
use `celery_app_for(settings)` only to publish task messages by name. Job state lives in SQL: Redis
is a wake-up signal, results are ignored, and every effect is fenced by a shard lease (db/leases.py).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from celery import Celery

from genq.settings import Settings, get_settings

RUN_SHARD_TASK = "genq.run_shard"
REAP_TASK = "genq.reap"
CONTROL_QUEUE = "genq.control"  # the reaper's queue; model queues are "genq.<model id>"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings genq relies on; see shared/reference/celery-reliability.md section 1."""
    vt = settings.visibility_timeout_seconds
    return {
        "broker_url": settings.broker_url or "memory://",
        "broker_connection_retry_on_startup": True,
        # Acknowledge after the task ran, requeue when the child dies; our attempt cap lives in the DB.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # kombu never extends the Redis visibility timeout: shards must finish well inside it, and
        # the shortest VT among all apps on the broker wins, so it is set in all three places.
        "visibility_timeout": vt,
        "broker_transport_options": {
            "visibility_timeout": vt,
            "health_check_interval": 25,
            "socket_keepalive": True,
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
        },
        "result_backend_transport_options": {"visibility_timeout": vt},
        # A Redis blip must not throw away GPU work; leases make a duplicate run harmless.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_seconds,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_default_queue": CONTROL_QUEUE,
        "task_routes": {REAP_TASK: {"queue": CONTROL_QUEUE}},
        # Publishing retries briefly; a message that is never sent is re-sent by the reaper.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 2},
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "genq-reaper": {
                "task": REAP_TASK,
                "schedule": float(settings.reaper_interval_seconds),
                # A reap message that waits longer than one interval is stale: the next one is coming.
                "options": {"queue": CONTROL_QUEUE, "expires": float(settings.reaper_interval_seconds)},
            }
        },
    }


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app configured from settings, with genq's tasks included (imported lazily by workers)."""
    app = Celery("genq", include=["workers.tasks"])
    app.conf.update(celery_config(settings))
    return app


_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def celery_app_for(settings: Settings) -> Celery:
    """The process-wide app for these settings (one connection pool per distinct configuration)."""
    key = json.dumps(celery_config(settings), sort_keys=True, default=str)
    with _apps_lock:
        if key not in _apps:
            _apps[key] = create_celery_app(settings)
        return _apps[key]


# What `celery -A workers.celery_app` and `genq worker` run; celery_app_for(settings) hands out this
# same app (and its broker connection pool) for the environment's settings.
app = celery_app_for(get_settings())
