"""What each task does, as plain functions over ids: load rows, do the work, store.

- ``shards``: render a generate job's shard; cut a split job's shard.
- ``training``: train a run, resuming from its checkpoint; store the model.
- ``analyses``: explore a dataset; report on a run.

The Celery tasks in ``workers.tasks`` are thin wrappers over these, and tests call
them directly. Every function may run twice for the same ids (late acks), so each
one checks the SQL state first and writes with idempotent upserts; status changes
go through ``shared.state``.
"""
