"""The OpenAI-compatible HTTP API: accepts and validates requests, records them through db/, stores
bytes through storage/, and hands shards to workers via workers.dispatch.

May import db, storage, genq.settings, workers.registry and workers.dispatch; never torch nor
workers.runtime. `api.main:app` is the ASGI app; `api.batch_service.create_batch` is the create path
shared with the embedded `genq run` command.
"""
