"""The production review queue: a Redis server shared by every replica.

Durability: what an acknowledged call survives is the server's persistence setting (the README's
"Review queue: Redis" names each); with ``appendonly yes`` and ``appendfsync always`` Redis fsyncs
the append-only file before it answers, so an acknowledged enqueue, claim or verdict survives a
crash of the server and a power loss.

Layout (every key under ``prefix``, default ``hitl:``; ``S`` is an item's arrival sequence number,
zero-padded to 16 digits, so that members sort lexicographically in arrival order):

- ``ids``: hash prediction id -> S, set with HSETNX: what makes enqueue idempotent;
- ``i:S``: hash, the item's state (``id batch row tier priority needed slots predicted classes
  state deliveries enqueued_at ver``) plus ``L:<reviewer>`` -> lease expiry per active lease;
- ``open:<tier>``: sorted set of the tier's open items with review slots left, score
  ``-priority`` and member S (equal scores sort by member: arrival order);
- ``age:<tier>``: sorted set of the tier's open items by ``enqueued_at`` (oldest age);
- ``lease:<tier>``: sorted set of leases, score the expiry (the server's clock), member S+reviewer;
- ``dead:<tier>``: set of dead-lettered S; ``done``: hash tier -> items done there;
- ``v:S``: hash verdict key (tier, reviewer) -> verdict record; ``vlog``: sorted set of every
  verdict by ``stored_at``; ``vcount``: hash action -> verdicts;
- ``b:<batch>``: each enqueued batch's items as one Arrow IPC blob, written once;
- ``seq``, ``batch``, ``vseq``: counters; ``tiers``: set of the tiers that ever held an item.

Atomic steps: an enqueue of one batch, a claim (expire leases, redeliver or dead-letter, lease
the top n) and a requeue are Lua scripts, each one round trip. A verdict batch is read by one
script, computed here with :func:`.base.check_verdict` and :func:`.base.resolve` (the one rule
both backends call), and written by a second script that first checks every touched item's
``ver`` (raised by every change of the item) and writes nothing when one moved on; the batch is
then read and computed again (optimistic concurrency: all or nothing, no lock held).
"""

from __future__ import annotations

import json
import math
import logging
import random
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from .base import (
    ItemState, QueueError, QueueOptions, ReviewQueue, Verdict, check_claim, check_verdict, resolve, verdict_rows,
)
from .items import from_ipc, review_items, to_ipc
from .payload import PayloadReader, claimed_items, history_line, verdict_table

log = logging.getLogger(__name__)

# Members per ZADD/unpack inside a script (Lua's unpack is bounded by its C stack, 8000 values).
_CHUNK = 1000
# Verdict submissions retried after a concurrent change to one of their items, before giving up.
_MAX_ATTEMPTS = 200

_ENQUEUE = """
local p, blob, at = ARGV[1], ARGV[2], ARGV[3]
local ids, tiers, prio = cjson.decode(ARGV[4]), cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local needed, pred, classes = cjson.decode(ARGV[7]), cjson.decode(ARGV[8]), cjson.decode(ARGV[9])
local n = #ids
local last = redis.call('INCRBY', p .. 'seq', n)
local batch = redis.call('INCR', p .. 'batch')
local new = {}
for i = 1, n do
  local s = string.format('%016d', last - n + i)
  if redis.call('HSETNX', p .. 'ids', ids[i], s) == 1 then new[#new + 1] = i end
end
if #new == 0 then return 0 end
redis.call('SET', p .. 'b:' .. batch, blob)
local open, age = {}, {}
for _, i in ipairs(new) do
  local s, t = string.format('%016d', last - n + i), tiers[i]
  redis.call('HSET', p .. 'i:' .. s, 'id', ids[i], 'batch', batch, 'row', i - 1, 'tier', t, 'priority', prio[i],
             'needed', needed[i], 'slots', needed[i], 'predicted', pred[i], 'classes', classes[i], 'state', 'open',
             'deliveries', 0, 'enqueued_at', at, 'ver', 0)
  if not open[t] then open[t], age[t] = {}, {} end
  local o, a = open[t], age[t]
  o[#o + 1] = -prio[i]; o[#o + 1] = s
  a[#a + 1] = at; a[#a + 1] = s
end
for t, o in pairs(open) do
  redis.call('SADD', p .. 'tiers', t)
  local a = age[t]
  for j = 1, #o, 2 * CHUNK do
    local k = math.min(j + 2 * CHUNK - 1, #o)
    redis.call('ZADD', p .. 'open:' .. t, unpack(o, j, k))
    redis.call('ZADD', p .. 'age:' .. t, unpack(a, j, k))
  end
end
return #new
""".replace("CHUNK", str(_CHUNK))

# Expire every lease past its time (the server's clock): the slot is offered again, or the item
# goes to the dead letter list once it has had max_deliveries deliveries. Shared by claim.
_EXPIRE = """
local function expire(p, now, maxd)
  for _, tier in ipairs(redis.call('SMEMBERS', p .. 'tiers')) do
    local lk = p .. 'lease:' .. tier
    local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now)
    if #expired > 0 then
      redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
      local touched, seen = {}, {}
      for _, m in ipairs(expired) do
        local s, r = string.sub(m, 1, 16), string.sub(m, 17)
        local ik = p .. 'i:' .. s
        redis.call('HDEL', ik, 'L:' .. r)
        if redis.call('HGET', ik, 'state') == 'open' then
          redis.call('HINCRBY', ik, 'slots', 1)
          if not seen[s] then seen[s] = true; touched[#touched + 1] = s end
        end
      end
      for _, s in ipairs(touched) do
        local ik = p .. 'i:' .. s
        local f = redis.call('HMGET', ik, 'deliveries', 'slots', 'priority', 'tier')
        local t = f[4]
        if tonumber(f[1]) >= maxd then
          redis.call('HSET', ik, 'state', 'dead')
          redis.call('ZREM', p .. 'open:' .. t, s)
          redis.call('ZREM', p .. 'age:' .. t, s)
          redis.call('SADD', p .. 'dead:' .. t, s)
          local fields = redis.call('HKEYS', ik)
          for _, name in ipairs(fields) do
            if string.sub(name, 1, 2) == 'L:' then
              redis.call('HDEL', ik, name)
              redis.call('ZREM', p .. 'lease:' .. t, s .. string.sub(name, 3))
            end
          end
        elseif tonumber(f[2]) > 0 then
          redis.call('ZADD', p .. 'open:' .. t, -tonumber(f[3]), s)
        end
        redis.call('HINCRBY', ik, 'ver', 1)
      end
    end
  end
end
"""

# ARGV: prefix, tier, reviewer, n, lease (s), max_deliveries, the reviewer's verdict key at tier.
_CLAIM = _EXPIRE + """
local p, tier, reviewer, vkey = ARGV[1], ARGV[2], ARGV[3], ARGV[7]
local n, lease, maxd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
expire(p, now, maxd)
local ok = p .. 'open:' .. tier
local picked, start, step = {}, 0, math.max(2 * n, 64)
while #picked < n do
  local members = redis.call('ZRANGE', ok, start, start + step - 1)
  if #members == 0 then break end
  for _, s in ipairs(members) do
    -- never the same item twice to one reviewer at a tier: not while leased, not after a verdict
    if not redis.call('HGET', p .. 'i:' .. s, 'L:' .. reviewer)
       and redis.call('HEXISTS', p .. 'v:' .. s, vkey) == 0 then
      picked[#picked + 1] = s
      if #picked == n then break end
    end
  end
  start = start + step
end
local until_ = now + lease
local out = {}
for _, s in ipairs(picked) do
  local ik = p .. 'i:' .. s
  redis.call('HSET', ik, 'L:' .. reviewer, until_)
  redis.call('ZADD', p .. 'lease:' .. tier, until_, s .. reviewer)
  if redis.call('HINCRBY', ik, 'slots', -1) <= 0 then redis.call('ZREM', ok, s) end
  redis.call('HINCRBY', ik, 'deliveries', 1)
  redis.call('HINCRBY', ik, 'ver', 1)
  local f = redis.call('HMGET', ik, 'id', 'batch', 'row', 'deliveries')
  out[#out + 1] = {f[1], f[2], f[3], f[4], redis.call('HVALS', p .. 'v:' .. s)}
end
return {string.format('%.17g', until_), out}
"""

# ARGV: prefix, ids... -> per id: false, or {S, the item hash, its verdict records}.
_READ = """
local p, out = ARGV[1], {}
for i = 2, #ARGV do
  local s = redis.call('HGET', p .. 'ids', ARGV[i])
  if s then
    out[#out + 1] = {s, redis.call('HGETALL', p .. 'i:' .. s), redis.call('HVALS', p .. 'v:' .. s)}
  else
    out[#out + 1] = false
  end
end
return out
"""

# ARGV: prefix, JSON {items: [[S, ver, tier before, tier, needed, slots, state, deliveries,
# [reviewers whose lease ends]]], verdicts: [[S, verdict key, record, action]]}. Writes nothing
# and returns false when an item's ver is not the one read; else the stored_at it gave.
_APPLY = """
local p = ARGV[1]
local doc = cjson.decode(ARGV[2])
for _, it in ipairs(doc.items) do
  if redis.call('HGET', p .. 'i:' .. it[1], 'ver') ~= it[2] then return false end
end
local clock = redis.call('TIME')
local stored_at = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local last = redis.call('INCRBY', p .. 'vseq', #doc.verdicts)
for i, v in ipairs(doc.verdicts) do
  local member = string.format('%016d', last - #doc.verdicts + i) .. v[3]
  redis.call('HSET', p .. 'v:' .. v[1], v[2], member)
  redis.call('ZADD', p .. 'vlog', stored_at, member)
  redis.call('HINCRBY', p .. 'vcount', v[4], 1)
end
for _, it in ipairs(doc.items) do
  local s, before, tier, slots, state = it[1], it[3], it[4], it[6], it[7]
  local ik = p .. 'i:' .. s
  for _, r in ipairs(it[9]) do
    redis.call('HDEL', ik, 'L:' .. r)
    redis.call('ZREM', p .. 'lease:' .. before, s .. r)
  end
  redis.call('HSET', ik, 'tier', tier, 'needed', it[5], 'slots', slots, 'state', state, 'deliveries', it[8])
  redis.call('HINCRBY', ik, 'ver', 1)
  if state ~= 'open' or tier ~= before or slots <= 0 then redis.call('ZREM', p .. 'open:' .. before, s) end
  if state ~= 'open' or tier ~= before then redis.call('ZREM', p .. 'age:' .. before, s) end
  if state == 'open' then
    local f = redis.call('HMGET', ik, 'priority', 'enqueued_at')
    if slots > 0 then redis.call('ZADD', p .. 'open:' .. tier, -tonumber(f[1]), s) end
    if tier ~= before then
      redis.call('ZADD', p .. 'age:' .. tier, f[2], s)
      redis.call('SADD', p .. 'tiers', tier)
    end
  elseif state == 'done' then
    redis.call('HINCRBY', p .. 'done', tier, 1)
  end
end
return stored_at
"""

# Every dead-lettered item offered again: deliveries reset, slots = needed - its settled verdicts
# at its tier. ARGV: prefix.
_REQUEUE = """
local p, count = ARGV[1], 0
for _, tier in ipairs(redis.call('SMEMBERS', p .. 'tiers')) do
  local dk = p .. 'dead:' .. tier
  for _, s in ipairs(redis.call('SMEMBERS', dk)) do
    local ik = p .. 'i:' .. s
    local f = redis.call('HMGET', ik, 'needed', 'priority', 'enqueued_at')
    local settled = 0
    for _, member in ipairs(redis.call('HVALS', p .. 'v:' .. s)) do
      local record = cjson.decode(string.sub(member, 17))
      if record[4] == tier and record[5] ~= 'escalate' then settled = settled + 1 end
    end
    local slots = tonumber(f[1]) - settled
    redis.call('HSET', ik, 'state', 'open', 'deliveries', 0, 'slots', slots)
    redis.call('HINCRBY', ik, 'ver', 1)
    if slots > 0 then redis.call('ZADD', p .. 'open:' .. tier, -tonumber(f[2]), s) end
    redis.call('ZADD', p .. 'age:' .. tier, f[3], s)
    count = count + 1
  end
  redis.call('DEL', dk)
end
return count
"""

# ARGV: prefix, tiers... -> {TIME, per tier {depth, in_flight, oldest enqueued_at or false, done,
# dead}, the vcount hash}.
_STATS = """
local p = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local out = {}
for i = 2, #ARGV do
  local t = ARGV[i]
  local oldest = redis.call('ZRANGE', p .. 'age:' .. t, 0, 0, 'WITHSCORES')[2] or false
  out[#out + 1] = {t, redis.call('ZCARD', p .. 'open:' .. t),
                   redis.call('ZCOUNT', p .. 'lease:' .. t, '(' .. string.format('%.17g', now), '+inf'),
                   oldest, redis.call('HGET', p .. 'done', t) or 0, redis.call('SCARD', p .. 'dead:' .. t)}
end
return {string.format('%.17g', now), out, redis.call('HGETALL', p .. 'vcount'), redis.call('SMEMBERS', p .. 'tiers')}
"""


class RedisQueue(ReviewQueue):
    """The queue on the Redis server at ``url`` (``redis://[:password@]host:port/db``), its keys
    under ``prefix`` so that the database can hold other things."""

    def __init__(self, url: str, options: QueueOptions | None = None, *, prefix: str = "hitl:"):
        self.options = (options or QueueOptions()).check()
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url)
        try:
            self._redis.ping()
        except redis.RedisError as error:
            raise QueueError(f"queue url: expected a Redis server at {url!r}, found none ({error})") from error
        self._enqueue = self._redis.register_script(_ENQUEUE)
        self._claim = self._redis.register_script(_CLAIM)
        self._read = self._redis.register_script(_READ)
        self._apply = self._redis.register_script(_APPLY)
        self._requeue = self._redis.register_script(_REQUEUE)
        self._stats = self._redis.register_script(_STATS)
        self._payload = PayloadReader(self._read_batch)

    def _read_batch(self, batch: int) -> pa.Table:
        blob = self._redis.get(f"{self.prefix}b:{batch}")
        if blob is None:
            raise QueueError(f"batch {batch}: expected its items under {self.prefix}b:{batch}, found none")
        return from_ipc(blob)

    def _now(self) -> float:
        """The server's clock (seconds since the epoch): replicas with skewed clocks agree."""
        seconds, micros = self._redis.time()
        return seconds + micros / 1e6

    # -- enqueue -----------------------------------------------------------------------------------

    def enqueue(self, decisions, predictions) -> int:
        items = review_items(decisions, predictions, keep_embedding=self.options.keep_embedding, now=self._now())
        if items.num_rows == 0:
            return 0
        tiers = _values(items, "tier")
        unknown = sorted(set(tiers) - set(self.options.tiers), key=str)
        if unknown:
            raise QueueError(f"decisions: tier: expected tiers among {self.options.tiers}, found {unknown}")
        priority = items.column("priority")
        if pc.any(pc.is_nan(priority)).as_py():
            raise QueueError("decisions: priority: expected numbers, found NaN")
        ids = items.column("id").combine_chunks()
        needed = np.ones(len(ids), np.int8)
        if self.options.overlap:
            tier_array = np.array(tiers, dtype=object)
            for tier in set(tiers):
                rows = tier_array == tier
                needed[rows] = self.options.needed(ids.filter(pa.array(rows)), tier)
        args = [self.prefix, to_ipc(items), repr(items.column("enqueued_at")[0].as_py()),
                json.dumps(ids.to_pylist()), json.dumps(tiers), json.dumps(_values(items, "priority")),
                json.dumps(needed.tolist()), json.dumps(_values(items, "predicted_class")),
                json.dumps(_values(items, "classes"))]
        return int(self._enqueue(args=args))

    # -- claim -------------------------------------------------------------------------------------

    def claim(self, tier: str, reviewer: str, n: int = 1, lease: float = 300.0) -> pa.Table:
        check_claim(tier, reviewer, n, lease, self.options)
        until, picked = self._claim(args=[self.prefix, tier, reviewer, n, repr(float(lease)),
                                          self.options.max_deliveries, _verdict_key(tier, reviewer)])
        refs = [(int(batch), int(row)) for _, batch, row, _, _ in picked]
        return claimed_items(self._payload, refs, tier, [int(p[3]) for p in picked], float(until),
                             [_history(p[4]) for p in picked], self.options.blind_audit)

    # -- verdicts ----------------------------------------------------------------------------------

    def submit(self, verdicts) -> dict:
        rows = verdict_rows(verdicts)
        ids = list(dict.fromkeys(v.id for v in rows))
        for attempt in range(_MAX_ATTEMPTS):
            items = {item_id: _Item.read(found) if found else None
                     for item_id, found in zip(ids, self._read(args=[self.prefix, *ids]) if ids else [])}
            counts, plan = self._plan(rows, items)
            if not plan["verdicts"] or self._apply(args=[self.prefix, json.dumps(plan)]) is not None:
                return counts
            time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))  # another call changed an item: again
        raise QueueError(f"verdicts: expected to store them within {_MAX_ATTEMPTS} attempts, found their items "
                         f"changed by other calls every time")

    def _plan(self, rows: list[Verdict], items: dict[str, "_Item | None"]) -> tuple[dict, dict]:
        """What ``rows`` do, computed on the items as read: the counts ``submit`` returns and the
        writes for the apply script (QueueError, naming the row, for a verdict refused)."""
        counts = {"stored": 0, "duplicates": 0, "done": 0, "moved": 0}
        writes: list[list[Any]] = []
        touched: dict[str, _Item] = {}
        for row, v in enumerate(rows):
            item = items[v.id]
            stored = item.verdicts.get((v.tier, v.reviewer)) if item else None
            if stored is not None:
                if not _same_verdict(v, stored.action, stored.label):
                    raise QueueError(f"verdicts row {row} (id {v.id!r}): expected the verdict {v.reviewer!r} already "
                                     f"submitted at tier {v.tier!r} ({stored.action} {stored.label}), found a "
                                     f"different one ({v.action} {v.label}); a verdict cannot be changed")
                counts["duplicates"] += 1
                continue
            v = check_verdict(v, item.state() if item else None, self.options, row)
            assert item is not None
            touched[v.id] = item
            item.verdicts[(v.tier, v.reviewer)] = v
            item.order.append(v)
            item.leases.discard(v.reviewer)
            at_tier = [x for x in item.order if x.tier == v.tier]
            outcome = resolve(item.state(), at_tier, self.options)
            counts["stored"] += 1
            record = json.dumps([v.id, v.label, v.reviewer, v.tier, v.action, None if v.ts != v.ts else v.ts,
                                 item.batch, item.row])
            writes.append([item.s, _verdict_key(v.tier, v.reviewer), record, v.action])
            if outcome.kind == "open":
                item.slots = item.needed - sum(x.action != "escalate" for x in at_tier) - len(item.leases)
                continue
            item.leases.clear()
            if outcome.kind == "done":
                item.status, item.slots = "done", 0
                counts["done"] += 1
            else:
                needed = outcome.needed if outcome.needed > 0 else int(self.options.needed([v.id], outcome.tier)[0])
                item.tier, item.needed, item.slots, item.deliveries = outcome.tier, needed, needed, 0
                counts["moved"] += 1
        plan = {"items": [item.write() for item in touched.values()], "verdicts": writes}
        return counts, plan

    # -- reading -----------------------------------------------------------------------------------

    def stats(self) -> dict:
        tiers = list(self.options.tiers)
        now, per_tier, actions, known = self._stats(args=[self.prefix, *tiers])
        extra = sorted(t.decode() for t in known if t.decode() not in tiers)
        if extra:  # items at tiers this queue's options do not name (opened with other options before)
            _, more, _, _ = self._stats(args=[self.prefix, *extra])
            per_tier += more
        out = {}
        for tier, depth, in_flight, oldest, done, dead in per_tier:
            out[tier.decode()] = {"depth": int(depth), "in_flight": int(in_flight),
                                  "oldest_age_s": 0.0 if oldest is None else max(0.0, float(now) - float(oldest)),
                                  "done": int(done), "dead": int(dead)}
        counted = {actions[i].decode(): int(actions[i + 1]) for i in range(0, len(actions), 2)}
        return {"tiers": out, "verdicts": {a: counted.get(a, 0) for a in ("confirm", "correct", "escalate", "out_of_scope")}}

    def verdicts(self, since: float | None = None) -> pa.Table:
        low = "-inf" if since is None else f"({float(since)!r}"
        rows = []
        for member, stored_at in self._redis.zrangebyscore(f"{self.prefix}vlog", low, "+inf", withscores=True):
            item_id, label, reviewer, tier, action, ts, batch, row = json.loads(member[16:])
            rows.append((item_id, label, reviewer, tier, action, stored_at if ts is None else ts, stored_at, batch, row))
        return verdict_table(rows, self._payload)

    def tier_of(self, item_id: str) -> str | None:
        s = self._redis.hget(f"{self.prefix}ids", item_id)
        tier = None if s is None else self._redis.hget(f"{self.prefix}i:{s.decode()}", "tier")
        return None if tier is None else tier.decode()

    def requeue_dead(self) -> int:
        return int(self._requeue(args=[self.prefix]))

    def close(self) -> None:
        self._redis.close()


class _Item:
    """An item's state as the read script returned it, changed in place by the verdicts of one
    submission (so that later rows see what earlier rows did)."""

    def __init__(self, s: str, fields: dict[str, str], records: list[bytes]):
        self.s, self.ver = s, fields["ver"]
        self.tier, self.before = fields["tier"], fields["tier"]
        self.needed, self.slots = int(fields["needed"]), int(fields["slots"])
        self.status, self.deliveries = fields["state"], int(fields["deliveries"])
        self.predicted, self.classes = int(fields["predicted"]), int(fields["classes"])
        self.batch, self.row = int(fields["batch"]), int(fields["row"])
        self.leases = {name[2:] for name in fields if name.startswith("L:")}
        self.held = set(self.leases)
        self.order: list[Verdict] = []
        for member in sorted(records):  # the sequence-number prefix: oldest first
            item_id, label, reviewer, tier, action, ts, _, _ = json.loads(member[16:])
            self.order.append(Verdict(item_id, label, reviewer, tier, action, math.nan if ts is None else ts))
        self.verdicts = {(v.tier, v.reviewer): v for v in self.order}

    @classmethod
    def read(cls, found: list) -> "_Item":
        s, flat, records = found
        fields = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return cls(s.decode(), fields, records)

    def state(self) -> ItemState:
        return ItemState(tier=self.tier, needed=self.needed, predicted_class=self.predicted, classes=self.classes,
                         done=self.status != "open")

    def write(self) -> list:
        return [self.s, self.ver, self.before, self.tier, self.needed, self.slots, self.status, self.deliveries,
                sorted(self.held - self.leases)]


def _verdict_key(tier: str, reviewer: str) -> str:
    """The field of a verdict in its item's ``v:S`` hash: one per (tier, reviewer), unambiguous
    whatever the names hold (the tier's length in UTF-8 bytes first)."""
    return f"{len(tier.encode())}:{tier}{reviewer}"


def _history(records: list[bytes]) -> list[str]:
    out = []
    for member in sorted(records):
        _, label, reviewer, tier, action, _, _, _ = json.loads(member[16:])
        out.append(history_line(tier, reviewer, action, label))
    return out


def _same_verdict(v: Verdict, action: str, label: int) -> bool:
    """A resubmission of the stored verdict (a confirm may leave its label out)."""
    return v.action == action and (v.label == label or (action == "confirm" and v.label == -1))


def _values(items: pa.Table, name: str) -> list:
    column = items.column(name)
    if column.null_count:
        raise QueueError(f"decisions: {name}: expected a value on every escalated row, found {column.null_count} null")
    return column.to_pylist()
