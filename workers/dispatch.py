"""Publishing shard tasks: which queue serves a model, and sending shard ids to it. Torch-free.

The API calls `enqueue_shards` after the batch and its shards are committed. A publish that fails
(Redis down) leaves the shard `queued` in SQL, and the reaper sends it again later: accepted work is
never lost, and a duplicate message is harmless because a worker must claim the shard's lease first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from genq.settings import Settings
from workers.celery_app import RUN_SHARD_TASK, celery_app_for

log = logging.getLogger(__name__)


def queue_for_model(model_id: str) -> str:
    """The Celery queue whose workers have model_id loaded."""
    return f"genq.{model_id}"


def enqueue_shards(settings: Settings, shards: list[tuple[int, str]]) -> int:
    """Sends one "genq.run_shard" message per (shard_id, queue); returns how many were published.

    Never raises for broker errors: the first failed publish (after the publish retry policy) ends the
    loop, since each further one would wait out the same retries; unsent shards stay queued and the
    reaper re-sends them.
    """
    if not shards or not settings.broker_url:
        return 0  # embedded mode: `genq run` executes shards in-process
    app = celery_app_for(settings)
    for sent, (shard_id, queue) in enumerate(shards):
        try:
            app.send_task(RUN_SHARD_TASK, args=[shard_id], queue=queue)
        except Exception as exc:  # kombu raises OperationalError and friends; the reaper recovers
            log.warning("could not publish shard %s to %s; %d shard(s) left for the reaper: %s", shard_id, queue,
                        len(shards) - sent, exc)
            return sent
    return len(shards)


def queue_depths(settings: Settings, queues: Iterable[str]) -> dict[str, int] | None:
    """Messages waiting in each queue (not those a worker has already taken); None if the broker can't say."""
    if not settings.broker_url:
        return None
    from amqp.exceptions import ChannelError

    depths: dict[str, int] = {}
    try:
        with celery_app_for(settings).connection_for_read() as connection:
            channel = connection.default_channel
            for queue in queues:
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:  # never declared: nothing was ever sent there, or it was flushed
                    depths[queue] = 0
    except Exception as exc:
        log.warning("could not read queue depths from the broker: %s", exc)
        return None
    return depths
