"""The Celery app: JSON-only messages, late acks, two queues.

Workers start it with ``captrain worker -Q cpu,gpu`` or ``celery -A shared.celery_app
worker``. The scheduler sends tasks by name, so it never imports the worker code
(or torch).

The configuration is read lazily (``config_from_object`` with a module path): the
embedded Redis is started only when a broker connection is actually needed.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

# Task names: the contract between scheduler and workers.
GENERATE_SHARD = "captrain.generate_shard"
SPLIT_SHARD = "captrain.split_shard"
TRAIN = "captrain.train"
PING = "captrain.ping"
EXPLORE = "captrain.explore"  # statistics and plots of a dataset (iris)
REPORT = "captrain.report"  # curves, prediction grid and confusion plots of a run
SWEEP_STEP = "captrain.sweep_step"  # ask a sweep's sampler for trials, or finish it

QUEUES = ("cpu", "gpu")
ROUTES = {
    GENERATE_SHARD: {"queue": "cpu"},
    SPLIT_SHARD: {"queue": "cpu"},
    PING: {"queue": "cpu"},
    EXPLORE: {"queue": "cpu"},
    REPORT: {"queue": "cpu"},
    SWEEP_STEP: {"queue": "cpu"},
    TRAIN: {"queue": "gpu"},
}

app = Celery("captrain", include=["workers.tasks"])
app.config_from_object("shared.celery_config")
app.conf.task_queues = [Queue(q, routing_key=q) for q in QUEUES]
app.conf.task_routes = ROUTES
