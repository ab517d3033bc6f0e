"""Execution: the Celery app, shard tasks, and the model runtime they call.

workers/registry.py is torch-free (the API imports it to list and validate models); everything
under workers/runtime/ imports torch and is loaded only in worker processes.
"""
