"""Celery settings, imported by Celery when the app first needs its configuration.

Each choice and its reason:
- JSON only: pickle on a shared broker lets anyone who can write to Redis run code
  on every worker.
- Late acks, reject on worker loss, prefetch 1: a task whose worker dies goes back
  to the queue instead of being lost; so every task is idempotent.
- visibility_timeout above the longest task: Redis redelivers an unacked message
  after it, so a shorter one would run a long training twice.
- No result backend: SQL is the system of record; completion is read from SQL.
- Events on: Flower shows workers and tasks live.
"""

from __future__ import annotations

from shared.embedded import ensure_broker
from shared.settings import get_settings

_settings = get_settings()

broker_url = ensure_broker(_settings)
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _settings.visibility_timeout,
    "socket_keepalive": True,
    "health_check_interval": 30,
}
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# A task goes on when the worker loses the broker: terminating it would rely on the
# broker delivering its message again, and a broker restarted without persistence
# has lost it, while SQL still says a live worker runs it, so nothing would re-send
# it (found by bench/soak.py). Running on is safe: tasks are idempotent, and a late
# second delivery of a train message stands down on the run's lease.
worker_cancel_long_running_tasks_on_connection_loss = False
task_ignore_result = True
result_backend = None
task_default_queue = "cpu"
task_create_missing_queues = False
worker_send_task_events = True
task_send_sent_event = True
worker_hijack_root_logger = False
worker_log_color = False
