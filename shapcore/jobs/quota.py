"""Per-key cap on explanation jobs in flight (queued, scheduled or started): ``EXPLAIN_MAX_JOBS_PER_KEY``.

Each principal (an API key's name, or the client address when authentication is off) has a
sorted set ``shapserve:explain:inflight:<queue>:<principal>`` of job ids, scored by the
time of their reservation. Reserving a place is one Lua script, so that concurrent
requests of one key (on any API replica) cannot overshoot: it drops the ids whose RQ job
has ended (finished, failed, stopped, canceled) or is gone, counts the rest and adds the new
id only if the count is under the cap. Nothing has to remove ids when jobs end: the next
reservation does. An id whose job hash does not exist yet (reserved, not yet enqueued) is
kept for :data:`RESERVATION_GRACE_S` seconds.
"""

from __future__ import annotations

import time
from typing import Any

from shapcore.jobs.keys import inflight_key

#: How long a reserved id may wait for its job hash before it stops counting.
RESERVATION_GRACE_S = 60

_RESERVE = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local live = 0
for i = 1, #ids, 2 do
  local id, reserved = ids[i], tonumber(ids[i + 1])
  local status = redis.call('HGET', ARGV[1] .. id, 'status')
  local ended = status == 'finished' or status == 'failed' or status == 'stopped' or status == 'canceled'
  if ended or ((not status) and reserved < tonumber(ARGV[5]) - tonumber(ARGV[6])) then
    redis.call('ZREM', KEYS[1], id)
  else
    live = live + 1
  end
end
if live >= tonumber(ARGV[2]) then
  return -live
end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return live + 1
"""


def reserve(connection: Any, queue_name: str, principal: str, job_id: str, limit: int, ttl_s: int) -> int:
    """Count ``job_id`` against ``principal``: the number in flight with it, or minus the number
    in flight when the cap ``limit`` is reached (nothing reserved then)."""
    from rq.job import Job

    return int(
        connection.eval(
            _RESERVE,
            1,
            inflight_key(queue_name, principal),
            Job.redis_job_namespace_prefix,
            limit,
            job_id,
            max(ttl_s, RESERVATION_GRACE_S),
            time.time(),
            RESERVATION_GRACE_S,
        )
    )


def release(connection: Any, queue_name: str, principal: str, job_id: str) -> None:
    """Give the place back (the job was not created after all)."""
    connection.zrem(inflight_key(queue_name, principal), job_id)
