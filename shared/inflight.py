"""Which task messages are in flight, kept beside the queues in the broker's Redis.

Three structures, each keyed by a message's work (task name and arguments):

- ``captrain:sending``, a hash key -> unix time: a sender is about to publish the
  message. The sender writes it before publishing;
- ``captrain:queued``, a set: the message was published and waits in a queue. After
  publishing, the sender moves each key from sending to queued, but only a key still
  in sending: a worker that already received the message has taken it out, so a
  queued marker never outlives its message's receipt;
- ``captrain:held``, a hash key -> worker: a worker received the message (it runs it,
  holds it reserved, or holds it for a retry's countdown). Receipt takes the key out
  of sending and queued and into held in one transaction; the worker removes the
  entry when the task ends.

The reconciler re-sends work only when none of them says it is alive: not queued,
not being sent (a sending entry counts for ``SEND_GRACE`` seconds; an older one is a
sender that died between the marker and the publish), not held by a live worker. So
any number of reconciles over a backlog adds no copy. All three live in the same
Redis as the queues: a flush or a restart without persistence loses the markers with
the messages, and the work is then re-sent from SQL, as it must be. Memory: a key is
about 40 bytes, so a million queued messages add about 100 MB to Redis beside the
messages themselves; a reconcile pass reads them with one SMISMEMBER and two HMGETs
per 10,000 keys.

Never raises: markers are an optimisation of the reconciler. A broker that cannot
be reached here cannot be reached by the queue either, and the reconciler then
re-sends what it cannot prove alive, which tasks tolerate (they are idempotent).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

SENDING = "captrain:sending"
QUEUED = "captrain:queued"
HELD = "captrain:held"
CHUNK = 10_000
# Seconds a sending entry counts as alive: far above the time a sender takes to
# publish (a group of 100,000 messages publishes in seconds).
SEND_GRACE = 120.0
_clients: dict[int, Any] = {}  # pid -> (kombu connection, redis client)


def key(name: str, args: Sequence[Any]) -> str:
    """The work a message does: ``captrain.generate_shard|[12, 3]``."""
    return f"{name}|{json.dumps(list(args))}"


def client() -> Any:
    """This process's redis client of the broker (its kombu connection's own, so that
    every broker URL form works: redis://, rediss://, redis+socket://)."""
    from shared.celery_app import app

    pid = os.getpid()
    if pid not in _clients:
        conn = app.connection_for_write()
        conn.ensure_connection(max_retries=1)
        _clients.clear()  # a forked child must not use its parent's socket
        _clients[pid] = (conn, conn.default_channel.client)
    return _clients[pid][1]


def _safely(what: str, fn: Any) -> Any:
    try:
        return fn(client())
    except Exception as exc:  # redis, socket and kombu's own connection errors alike
        _clients.clear()
        log.warning("in-flight markers not %s: %s", what, exc)
        return None


def mark_sending(keys: Iterable[str]) -> None:
    """Record that messages doing ``keys`` are about to be published."""
    keys, now = list(keys), time.time()

    def add(r: Any) -> None:
        for i in range(0, len(keys), CHUNK):
            r.hset(SENDING, mapping=dict.fromkeys(keys[i:i + CHUNK], now))

    if keys:
        _safely("recorded", add)


# Sending -> queued for each key still being sent: a worker that received the message
# meanwhile took the key out of sending, and it must not come back as queued.
_PUBLISHED = ("local n = 0 for _, k in ipairs(ARGV) do "
              "if redis.call('HDEL', KEYS[1], k) == 1 then "
              "redis.call('SADD', KEYS[2], k) n = n + 1 end end return n")


def mark_published(keys: Iterable[str]) -> None:
    """The messages doing ``keys`` were published: each waits in a queue, unless a
    worker received it already."""
    keys = list(keys)

    def move(r: Any) -> None:
        for i in range(0, len(keys), CHUNK):
            r.eval(_PUBLISHED, 2, SENDING, QUEUED, *keys[i:i + CHUNK])

    if keys:
        _safely("recorded", move)


def unmark_sending(keys: Iterable[str]) -> None:
    """The messages doing ``keys`` were not published after all (the broker refused)."""
    keys = list(keys)
    if keys:
        _safely("dropped", lambda r: r.hdel(SENDING, *keys))


def mark_requeued(work: str) -> None:
    """The message doing ``work`` goes back to its queue (a worker's warm shutdown
    rejects it with requeue): marked before the message is back, so before any
    worker can receive it again."""
    _safely("recorded", lambda r: r.sadd(QUEUED, work))


def received(work: str, tag: str) -> None:
    """A worker received the message doing ``work`` (``tag``: see holder_tag)."""
    def move(r: Any) -> None:
        pipe = r.pipeline()  # MULTI/EXEC: the reconciler sees before or after, not between
        pipe.srem(QUEUED, work)
        pipe.hdel(SENDING, work)
        pipe.hset(HELD, work, tag)
        pipe.execute()

    _safely("moved to held", move)


# Compare-and-delete: drop a held entry only if it is still this delivery's (a retry
# of the task may already have been received, by this worker or another).
_RELEASE = ("if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then "
            "return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0")


def holder_tag(worker: str, task_id: str, retries: int) -> str:
    """What a held entry says: the worker, and which delivery of the task it holds."""
    return f"{worker}|{task_id}|{retries}"


def holder(tag: str) -> str:
    """The worker a held entry names."""
    return tag.split("|")[0]


def released(work: str, tag: str) -> None:
    """The delivery ``tag`` of the task doing ``work`` ended on its worker."""
    _safely("released", lambda r: r.eval(_RELEASE, 1, HELD, work, tag))


def lead(lock: str, me: str, ttl_ms: int) -> bool:
    """Take or keep the lock ``lock`` for ``me``, expiring after ``ttl_ms``. False
    when another holds it, or the broker cannot be reached."""
    def take(r: Any) -> bool:
        if r.set(lock, me, nx=True, px=ttl_ms):
            return True
        if text(r.get(lock) or b"") == me:
            r.pexpire(lock, ttl_ms)
            return True
        return False

    return bool(_safely("locked", take))


def forget(works: Iterable[str]) -> None:
    """Drop the markers of ``works`` (the reconciler: their work is done or lost)."""
    works = list(works)
    if works:
        _safely("forgotten", lambda r: (r.srem(QUEUED, *works), r.hdel(SENDING, *works),
                                        r.hdel(HELD, *works)))


def state(works: Sequence[str]) -> tuple[set[str], dict[str, str]] | None:
    """(the keys among ``works`` waiting: queued, or being sent for less than
    ``SEND_GRACE``; the held ones with their holders), or None when the broker cannot
    tell (then nothing is known to be alive)."""
    def read(r: Any) -> tuple[set[str], dict[str, str]]:
        waiting: set[str] = set()
        held: dict[str, str] = {}
        since = time.time() - SEND_GRACE
        for i in range(0, len(works), CHUNK):
            part = list(works[i:i + CHUNK])
            flags = r.smismember(QUEUED, part)
            sending = r.hmget(SENDING, part)
            waiting |= {k for k, f, t in zip(part, flags, sending, strict=True)
                        if f or (t is not None and float(text(t)) >= since)}
            holders = r.hmget(HELD, part)
            held |= {k: text(h) for k, h in zip(part, holders, strict=True) if h}
        return waiting, held

    return _safely("read", read) if works else (set(), {})


def sending_entries() -> dict[str, float]:
    """Every sending entry with its time (the reconciler sweeps old ones)."""
    got = _safely("read", lambda r: r.hgetall(SENDING))
    return {text(k): float(text(v)) for k, v in (got or {}).items()}


def held_entries() -> dict[str, str]:
    """Every held entry (the reconciler sweeps those of finished or lost work)."""
    got = _safely("read", lambda r: r.hgetall(HELD))
    return {text(k): text(v) for k, v in (got or {}).items()}


def text(v: Any) -> str:
    """A Redis reply as str."""
    return v.decode() if isinstance(v, bytes) else str(v)
