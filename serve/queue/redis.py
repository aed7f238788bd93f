"""The production review queue: a Redis server shared by every replica.

Durability: what an acknowledged call survives is the server's persistence setting (the README's
"Review queue" section names each); with ``appendonly yes`` and ``appendfsync always`` Redis
fsyncs the append-only file before it answers, so an acknowledged enqueue, claim or verdict
survives a crash of the server and a power loss.

Layout (every key under ``prefix``, default ``hitl:``; ``S`` is an item's arrival sequence number
zero-padded to 16 digits, so that members with equal scores sort in arrival order):

- ``items``: hash prediction id -> the item's record. An id already there is skipped, which makes
  enqueue idempotent. The record is a JSON array (the ``R_*`` positions below): S, batch, score
  (``-priority``, as text), enqueued_at (text), row, predicted class, C, tier, reviews needed, slots
  (reviews still to hand out), state (open | done | dead), deliveries, version (raised by every
  change), leases {reviewer: expiry}, and the verdicts at the item's tier {reviewer: action}.
  One hash written 1,000 fields a command, not a hash per item: a command from Lua costs about
  4 us on the 2-core VM, most of the 5 us per item that 200,000 items/s allows;
- ``open:<tier>``: sorted set of the tier's open items with slots left, score ``-priority``,
  member S followed by the id: ZRANGE from the start is priority order, ties in arrival order;
- ``lease:<tier>``: sorted set of leases, score the expiry on the server's clock, member the id's
  length, ``:``, the id and the reviewer;
- ``age:<tier>`` / ``agecount:<tier>``: the batches with open items at the tier by enqueued_at, and
  how many each has (``oldest_age_s`` without a member per item);
- ``dead:<tier>``: set of dead-lettered ids; ``done``: hash tier -> items done there;
- ``v:S``: hash (tier, reviewer) -> verdict; ``vlog``: sorted set of every verdict by stored_at;
  ``vcount``: hash action -> verdicts;
- ``b:<batch>``: an enqueued batch's items as one Arrow IPC blob, written once;
- ``gold``: hash id -> label of the gold items (:mod:`.gold`);
- ``seq``, ``batch``, ``vseq``: counters; ``tiers``: set of the tiers that ever held an item.

Atomic steps: an enqueue (of one batch or several), a claim (expire leases, redeliver or
dead-letter, lease the top n) and a requeue are Lua scripts, one round trip each. A verdict batch
is read by one script, computed here with :func:`.base.check_verdict` and :func:`.base.resolve`
(the one rule both backends call), and written by a second script that first checks that every
touched item's record is still the one read and writes nothing otherwise; the batch is then read
and computed again (optimistic concurrency: all or nothing, no lock held between round trips).
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from .base import (
    ACTIONS, ItemState, PreparedBatch, QueueError, QueueOptions, ReviewQueue, Verdict, check_claim, check_resubmission,
    check_verdict, prepare_batch, resolve, verdict_rows,
)
from .items import from_ipc
from .payload import PayloadReader, claimed_items, history_line, verdict_table

# Positions in an item's record (0-based here; Lua's are one more).
R_S, R_BATCH, R_SCORE, R_AT, R_ROW, R_PREDICTED, R_CLASSES, R_TIER, R_NEEDED, R_SLOTS, R_STATE, R_DELIVERIES, \
    R_VER, R_LEASES, R_BY = range(15)
# Values per command inside a script (Lua's unpack is bounded by its C stack, about 8000).
_CHUNK = 2000
# Verdict submissions retried after a concurrent change to one of their items, before giving up.
_MAX_ATTEMPTS = 200

# Lua shared by the scripts. Record fields (1-based): 1 S, 2 batch, 3 score, 4 enqueued_at, 5 row,
# 6 predicted, 7 classes, 8 tier, 9 needed, 10 slots, 11 state, 12 deliveries, 13 version,
# 14 leases {reviewer: expiry}, 15 verdicts at the tier {reviewer: action}.
_LUA_COMMON = "local CHUNK = " + str(_CHUNK) + r"""
-- redis.call(command, key, values...) over values in chunks (pairs stay whole: CHUNK is even)
local function bulk(command, key, values)
  for j = 1, #values, CHUNK do
    redis.call(command, key, unpack(values, j, math.min(j + CHUNK - 1, #values)))
  end
end
local function push(list, a, b) list[#list + 1] = a; list[#list + 1] = b end
local function group(groups, name)
  local g = groups[name]
  if not g then g = {}; groups[name] = g end
  return g
end
-- a lease's member in lease:<tier>: the id's length, ':', the id, the reviewer (unambiguous)
local function lease_member(id, reviewer) return #id .. ':' .. id .. reviewer end
local function lease_parts(m)
  local colon = string.find(m, ':', 1, true)
  local n = tonumber(string.sub(m, 1, colon - 1))
  return string.sub(m, colon + 1, colon + n), string.sub(m, colon + n + 1)
end
-- age:<tier> holds each batch with open items at the tier (score its enqueued_at) and
-- agecount:<tier> how many: the oldest open item's age without a member per item
local function leave(p, tier, rec)
  local key = p .. 'agecount:' .. tier
  if redis.call('HINCRBY', key, rec[2], -1) <= 0 then
    redis.call('HDEL', key, rec[2])
    redis.call('ZREM', p .. 'age:' .. tier, rec[2])
  end
end
local function enter(p, tier, rec)
  if redis.call('HINCRBY', p .. 'agecount:' .. tier, rec[2], 1) == 1 then
    redis.call('ZADD', p .. 'age:' .. tier, rec[4], rec[2])
  end
end
"""

# ARGV: prefix, k, then per batch: blob, enqueued_at, JSON ids, JSON tier names, JSON tier of each
# item (index into the names), then one line per item of its score and of its record's tail (the
# fields after S and batch, made by Arrow). Returns the items added (ids already queued, or
# repeated, are skipped).
_ENQUEUE = _LUA_COMMON + r"""
local p, k = ARGV[1], tonumber(ARGV[2])
local added, seen = 0, {}
for b = 0, k - 1 do
  local a = 2 + 7 * b
  local blob, at, ids, names = ARGV[a + 1], ARGV[a + 2], cjson.decode(ARGV[a + 3]), cjson.decode(ARGV[a + 4])
  local tiers, scores, tails = cjson.decode(ARGV[a + 5]), cjson.decode(ARGV[a + 6]), cjson.decode(ARGV[a + 7])
  local known = {}
  for j = 1, #ids, CHUNK do
    for _, rec in ipairs(redis.call('HMGET', p .. 'items', unpack(ids, j, math.min(j + CHUNK - 1, #ids)))) do
      known[#known + 1] = rec
    end
  end
  local new = {}
  for i = 1, #ids do
    if not known[i] and not seen[ids[i]] then seen[ids[i]] = true; new[#new + 1] = i end
  end
  if #new > 0 then
    local last = redis.call('INCRBY', p .. 'seq', #new)
    local batch = redis.call('INCR', p .. 'batch')
    redis.call('SET', p .. 'b:' .. batch, blob)
    local records, open, count = {}, {}, {}
    local head = '",' .. batch .. ','
    for j, i in ipairs(new) do
      local s, t = string.format('%016d', last - #new + j), names[tiers[i] + 1]
      local o = open[t]
      if not o then o = {}; open[t] = o; count[t] = 0 end
      records[#records + 1] = ids[i]
      records[#records + 1] = '["' .. s .. head .. tails[i]
      o[#o + 1] = scores[i]
      o[#o + 1] = s .. ids[i]
      count[t] = count[t] + 1
    end
    bulk('HSET', p .. 'items', records)
    for t, members in pairs(open) do
      redis.call('SADD', p .. 'tiers', t)
      bulk('ZADD', p .. 'open:' .. t, members)
      redis.call('HSET', p .. 'agecount:' .. t, batch, count[t])
      redis.call('ZADD', p .. 'age:' .. t, at, batch)
    end
    added = added + #new
  end
end
return added
"""

# Every lease past its time (the server's clock): its slot is offered again, or the item goes to
# the dead letter list once it has had max_deliveries deliveries (its other leases end too).
_EXPIRE = _LUA_COMMON + r"""
local function expire(p, now, maxd)
  for _, tier in ipairs(redis.call('SMEMBERS', p .. 'tiers')) do
    local lk = p .. 'lease:' .. tier
    local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now)
    if #expired > 0 then
      redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
      local records, order, freed = {}, {}, {}
      for _, m in ipairs(expired) do
        local id, r = lease_parts(m)
        local rec = records[id]
        if not rec then
          rec = cjson.decode(redis.call('HGET', p .. 'items', id)); records[id] = rec; order[#order + 1] = id
        end
        rec[14][r] = nil
        if rec[11] == 'open' then rec[10] = rec[10] + 1; freed[id] = true end
      end
      local writes = {}
      for _, id in ipairs(order) do
        local rec = records[id]
        local t = rec[8]
        if freed[id] and rec[12] >= maxd then
          rec[11] = 'dead'
          redis.call('ZREM', p .. 'open:' .. t, rec[1] .. id)
          leave(p, t, rec)
          redis.call('SADD', p .. 'dead:' .. t, id)
          for r, _ in pairs(rec[14]) do redis.call('ZREM', p .. 'lease:' .. t, lease_member(id, r)) end
          rec[14] = {}
        elseif freed[id] and rec[10] > 0 then
          redis.call('ZADD', p .. 'open:' .. t, rec[3], rec[1] .. id)
        end
        rec[13] = rec[13] + 1
        push(writes, id, cjson.encode(rec))
      end
      bulk('HSET', p .. 'items', writes)
    end
  end
end
"""

# ARGV: prefix, tier, reviewer, n, lease (s), max_deliveries -> {lease expiry, per item
# {batch, row, deliveries, its verdict records}}.
_CLAIM = _EXPIRE + r"""
local p, tier, reviewer = ARGV[1], ARGV[2], ARGV[3]
local n, lease, maxd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
expire(p, now, maxd)
local ok = p .. 'open:' .. tier
local picked, start, step = {}, 0, math.max(2 * n, 64)
while #picked < n do
  local members = redis.call('ZRANGE', ok, start, start + step - 1)
  if #members == 0 then break end
  for _, m in ipairs(members) do
    local id = string.sub(m, 17)
    local rec = cjson.decode(redis.call('HGET', p .. 'items', id))
    -- never the same item twice to one reviewer at a tier: not while leased, not after a verdict
    if rec[14][reviewer] == nil and rec[15][reviewer] == nil then
      picked[#picked + 1] = {id, rec, m}
      if #picked == n then break end
    end
  end
  start = start + step
end
local expiry = now + lease
local until_ = string.format('%.17g', expiry)
local writes, leases, full, out = {}, {}, {}, {}
for _, pick in ipairs(picked) do
  local id, rec = pick[1], pick[2]
  rec[14][reviewer] = until_
  rec[10] = rec[10] - 1
  rec[12] = rec[12] + 1
  rec[13] = rec[13] + 1
  if rec[10] <= 0 then full[#full + 1] = pick[3] end
  push(writes, id, cjson.encode(rec))
  push(leases, expiry, lease_member(id, reviewer))
  out[#out + 1] = {rec[2], rec[5], rec[12], redis.call('HVALS', p .. 'v:' .. rec[1])}
end
if #picked > 0 then
  bulk('HSET', p .. 'items', writes)
  bulk('ZADD', p .. 'lease:' .. tier, leases)
  bulk('ZREM', ok, full)
end
return {until_, out}
"""

# ARGV: prefix, ids... -> per id: false, or {its record, its verdict records}.
_READ = r"""
local p, out = ARGV[1], {}
for i = 2, #ARGV do
  local record = redis.call('HGET', p .. 'items', ARGV[i])
  if record then
    -- every record starts with '["' and S (16 digits): no need to decode it here
    out[#out + 1] = {record, redis.call('HVALS', p .. 'v:' .. string.sub(record, 3, 18))}
  else
    out[#out + 1] = false
  end
end
return out
"""

# ARGV: prefix, JSON {items: [[id, tier before, tier, state, slots, [reviewers whose lease
# ends], S, batch, score, enqueued_at]], verdicts: [[S, verdict key, record]], actions:
# {action: count}}, then per item its record as read and its new record. Writes nothing and returns false when an item's record is not
# the one read; else the stored_at it gave the verdicts.
_APPLY = _LUA_COMMON + r"""
local p = ARGV[1]
local doc = cjson.decode(ARGV[2])
for i, it in ipairs(doc.items) do
  if redis.call('HGET', p .. 'items', it[1]) ~= ARGV[1 + 2 * i] then return false end
end
local clock = redis.call('TIME')
local stored_at = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local last = redis.call('INCRBY', p .. 'vseq', #doc.verdicts)
local log = {}
for i, v in ipairs(doc.verdicts) do
  local member = string.format('%016d', last - #doc.verdicts + i) .. v[3]
  redis.call('HSET', p .. 'v:' .. v[1], v[2], member)
  push(log, stored_at, member)
end
bulk('ZADD', p .. 'vlog', log)
for action, count in pairs(doc.actions) do redis.call('HINCRBY', p .. 'vcount', action, count) end
local writes = {}
for i, it in ipairs(doc.items) do
  local id, before, tier, state, slots = it[1], it[2], it[3], it[4], it[5]
  local rec = {it[7], it[8], it[9], it[10]}  -- the record's first fields, all leave/enter use
  push(writes, id, ARGV[2 + 2 * i])
  for _, r in ipairs(it[6]) do redis.call('ZREM', p .. 'lease:' .. before, lease_member(id, r)) end
  if state ~= 'open' or tier ~= before or slots <= 0 then redis.call('ZREM', p .. 'open:' .. before, rec[1] .. id) end
  if state ~= 'open' or tier ~= before then leave(p, before, rec) end
  if state == 'open' then
    if slots > 0 then redis.call('ZADD', p .. 'open:' .. tier, rec[3], rec[1] .. id) end
    if tier ~= before then
      enter(p, tier, rec)
      redis.call('SADD', p .. 'tiers', tier)
    end
  elseif state == 'done' then
    redis.call('HINCRBY', p .. 'done', tier, 1)
  end
end
bulk('HSET', p .. 'items', writes)
return stored_at
"""

# Every dead-lettered item offered again: deliveries reset, slots = needed - its settled verdicts
# at its tier. ARGV: prefix.
_REQUEUE = _LUA_COMMON + r"""
local p, count = ARGV[1], 0
for _, tier in ipairs(redis.call('SMEMBERS', p .. 'tiers')) do
  local dk = p .. 'dead:' .. tier
  local writes = {}
  for _, id in ipairs(redis.call('SMEMBERS', dk)) do
    local rec = cjson.decode(redis.call('HGET', p .. 'items', id))
    local settled = 0
    for _, action in pairs(rec[15]) do
      if action ~= 'escalate' then settled = settled + 1 end
    end
    rec[10], rec[11], rec[12], rec[13] = rec[9] - settled, 'open', 0, rec[13] + 1
    if rec[10] > 0 then redis.call('ZADD', p .. 'open:' .. tier, rec[3], rec[1] .. id) end
    enter(p, tier, rec)
    push(writes, id, cjson.encode(rec))
    count = count + 1
  end
  bulk('HSET', p .. 'items', writes)
  redis.call('DEL', dk)
end
return count
"""

# ARGV: prefix, tiers... -> {TIME, per tier {tier, depth, in_flight, oldest enqueued_at or false,
# done, dead}, the vcount hash, every tier that held an item}.
_STATS = r"""
local p = ARGV[1]
local clock = redis.call('TIME')
local now = string.format('%.17g', tonumber(clock[1]) + tonumber(clock[2]) / 1e6)
local out = {}
for i = 2, #ARGV do
  local t = ARGV[i]
  local oldest = redis.call('ZRANGE', p .. 'age:' .. t, 0, 0, 'WITHSCORES')[2] or false
  local in_flight = redis.call('ZCOUNT', p .. 'lease:' .. t, '(' .. now, '+inf')
  local done = redis.call('HGET', p .. 'done', t) or 0
  out[#out + 1] = {t, redis.call('ZCARD', p .. 'open:' .. t), in_flight, oldest, done, redis.call('SCARD', p .. 'dead:' .. t)}
end
return {now, out, redis.call('HGETALL', p .. 'vcount'), redis.call('SMEMBERS', p .. 'tiers')}
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

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _read_batch(self, batch: int) -> pa.Table:
        blob = cast("bytes | None", self._redis.get(self._key(f"b:{batch}")))
        if blob is None:
            raise QueueError(f"batch {batch}: expected its items under {self._key(f'b:{batch}')}, found none")
        return from_ipc(blob)

    def _now(self) -> float:
        """The server's clock (seconds since the epoch): replicas with skewed clocks agree."""
        seconds, micros = self._redis.time()
        return seconds + micros / 1e6

    # -- enqueue -----------------------------------------------------------------------------------

    def enqueue(self, decisions, predictions) -> int:
        return self.enqueue_many([(decisions, predictions)])

    def enqueue_many(self, batches) -> int:
        batches, gold = self._with_gold(batches)
        now = self._now()
        args: list[Any] = []
        for decisions, predictions in batches:
            p = prepare_batch(decisions, predictions, self.options, now=now)
            if p is not None:
                args += _enqueue_args(p)
        if not args:
            return 0
        if gold:  # the answers first: one without its item (a failed enqueue) is never read
            self._redis.hset(self._key("gold"), mapping=cast(Any, gold))
        return int(self._enqueue(args=[self.prefix, len(args) // 7, *args]))

    # -- claim -------------------------------------------------------------------------------------

    def claim(self, tier: str, reviewer: str, n: int = 1, lease: float = 300.0) -> pa.Table:
        check_claim(tier, reviewer, n, lease, self.options)
        until, picked = self._claim(args=[self.prefix, tier, reviewer, n, repr(float(lease)),
                                          self.options.max_deliveries])
        return claimed_items(self._payload, [(int(b), int(r)) for b, r, _, _ in picked], tier,
                             [int(d) for _, _, d, _ in picked], float(until),
                             [[history_line(v.tier, v.reviewer, v.action, v.label) for v in _verdicts(records)]
                              for _, _, _, records in picked],
                             self.options.blind_audit, self.options.blind_share)

    # -- verdicts ----------------------------------------------------------------------------------

    def submit(self, verdicts) -> dict:
        rows = verdict_rows(verdicts)
        ids = list(dict.fromkeys(v.id for v in rows))
        for attempt in range(_MAX_ATTEMPTS):
            found = self._read(args=[self.prefix, *ids]) if ids else []
            items = {item_id: None if f is None else _Item(item_id, *f) for item_id, f in zip(ids, found)}
            counts, plan, records = self._plan(rows, items)
            if not plan["verdicts"] or self._apply(args=[self.prefix, json.dumps(plan), *records]) is not None:
                return counts
            time.sleep(random.uniform(0, 0.001 * min(attempt, 20)))  # another call changed an item: again
        raise QueueError(f"verdicts: expected to store them within {_MAX_ATTEMPTS} attempts, found their items "
                         "changed by other calls every time")

    def _plan(self, rows: list[Verdict], items: dict[str, "_Item | None"]) -> tuple[dict, dict, list[bytes]]:
        """What ``rows`` do to the items as read: the counts ``submit`` returns, the apply
        script's plan and its records (QueueError, naming the row, for a verdict refused)."""
        counts = {"stored": 0, "duplicates": 0, "done": 0, "moved": 0}
        verdicts: list[list[Any]] = []
        actions: collections.Counter[str] = collections.Counter()
        touched: dict[str, _Item] = {}
        for row, v in enumerate(rows):
            item = items[v.id]
            stored = item.verdicts.get((v.tier, v.reviewer)) if item else None
            if stored is not None:
                check_resubmission(v, stored.action, stored.label, row)
                counts["duplicates"] += 1
                continue
            v = check_verdict(v, item.state() if item else None, self.options, row)
            assert item is not None
            touched[v.id] = item
            item.add(v)
            at_tier = [x for x in item.order if x.tier == v.tier]
            outcome = resolve(item.state(), at_tier, self.options)
            counts["stored"] += 1
            record = json.dumps([v.id, v.label, v.reviewer, v.tier, v.action, None if math.isnan(v.ts) else v.ts,
                                 item.record[R_BATCH], item.record[R_ROW]])
            verdicts.append([item.s, _verdict_key(v.tier, v.reviewer), record])
            actions[v.action] += 1
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
        plan = {"items": [item.change() for item in touched.values()], "verdicts": verdicts, "actions": dict(actions)}
        records = [r for item in touched.values() for r in (item.read_as, item.encode())]
        return counts, plan, records

    # -- reading -----------------------------------------------------------------------------------

    def stats(self) -> dict:
        tiers = list(self.options.tiers)
        now, per_tier, actions, known = self._stats(args=[self.prefix, *tiers])
        extra = sorted(t.decode() for t in known if t.decode() not in tiers)
        if extra:  # items at tiers this queue's options do not name (opened with other options before)
            per_tier += self._stats(args=[self.prefix, *extra])[1]
        out = {}
        for tier, depth, in_flight, oldest, done, dead in per_tier:
            out[tier.decode()] = {"depth": int(depth), "in_flight": int(in_flight),
                                  "oldest_age_s": 0.0 if oldest is None else max(0.0, float(now) - float(oldest)),
                                  "done": int(done), "dead": int(dead)}
        counted = {actions[i].decode(): int(actions[i + 1]) for i in range(0, len(actions), 2)}
        return {"tiers": out, "verdicts": {a: counted.get(a, 0) for a in ACTIONS}}

    def verdicts(self, since: float | None = None) -> pa.Table:
        low = "-inf" if since is None else f"({float(since)!r}"
        rows = []
        logged = cast("list[tuple[bytes, float]]",
                      self._redis.zrangebyscore(self._key("vlog"), low, "+inf", withscores=True))
        for member, stored_at in logged:
            item_id, label, reviewer, tier, action, ts, batch, row = json.loads(member[16:])
            ts = stored_at if ts is None else ts  # a verdict sent without a time took the time it was stored
            rows.append((item_id, label, reviewer, tier, action, ts, stored_at, batch, row))
        gold = {k.decode(): int(v) for k, v in cast("dict[bytes, bytes]", self._redis.hgetall(self._key("gold"))).items()}
        return verdict_table(rows, self._payload, self.options, gold)

    def tier_of(self, item_id: str) -> str | None:
        record = self._redis.hget(self._key("items"), item_id)
        return None if record is None else json.loads(record)[R_TIER]

    def requeue_dead(self) -> int:
        return int(self._requeue(args=[self.prefix]))

    def close(self) -> None:
        self._redis.close()


class _Item:
    """An item as the read script returned it, changed in place by the verdicts of one submission
    (so that later rows see what earlier rows did)."""

    def __init__(self, item_id: str, record: bytes, verdict_records: list[bytes]):
        self.id, self.read_as = item_id, record
        self.record = json.loads(record)
        self.s = self.record[R_S]
        self.tier, self.before = self.record[R_TIER], self.record[R_TIER]
        self.needed, self.slots = self.record[R_NEEDED], self.record[R_SLOTS]
        self.status, self.deliveries = self.record[R_STATE], self.record[R_DELIVERIES]
        self.leases = set(self.record[R_LEASES])
        self.held = set(self.leases)
        self.order = _verdicts(verdict_records)
        self.verdicts = {(v.tier, v.reviewer): v for v in self.order}

    def state(self) -> ItemState:
        return ItemState(tier=self.tier, needed=self.needed, predicted_class=self.record[R_PREDICTED],
                         classes=self.record[R_CLASSES], done=self.status != "open")

    def add(self, v: Verdict) -> None:
        self.verdicts[(v.tier, v.reviewer)] = v
        self.order.append(v)
        self.leases.discard(v.reviewer)

    def change(self) -> list:
        """The apply script's view: [id, tier before, tier, state, slots, reviewers whose lease ends,
        S, batch, score, enqueued_at]."""
        return [self.id, self.before, self.tier, self.status, self.slots, sorted(self.held - self.leases),
                *self.record[R_S:R_AT + 1]]

    def encode(self) -> bytes:
        record = list(self.record)
        record[R_TIER], record[R_NEEDED], record[R_SLOTS] = self.tier, self.needed, self.slots
        record[R_STATE], record[R_DELIVERIES], record[R_VER] = self.status, self.deliveries, record[R_VER] + 1
        record[R_LEASES] = {r: until for r, until in self.record[R_LEASES].items() if r in self.leases}
        record[R_BY] = {v.reviewer: v.action for v in self.order if v.tier == self.tier}
        return json.dumps(record).encode()


def _enqueue_args(p: PreparedBatch) -> list:
    """The enqueue script's arguments for one batch. Each item's record, but for the S and batch
    number the script gives it, is made here by Arrow: text for every number (shortest round-trip
    form, so a score read back is the float32 priority exactly), no Python work per item."""
    items, at = p.items, repr(p.enqueued_at)
    for name in ("priority", "predicted_class", "classes"):
        if items.column(name).null_count:
            raise QueueError(f"decisions: {name}: expected a value on every escalated row, found null")
    priority = items.column("priority").cast(pa.float64())
    if pc.any(pc.is_nan(priority)).as_py():
        raise QueueError("decisions: priority: expected numbers, found NaN")
    scores = pc.negate(priority).cast(pa.string())
    names = sorted(set(p.tiers))
    tier_of_item = pc.index_in(items.column("tier"), value_set=pa.array(names, pa.string()))
    needed = pa.array(p.needed, pa.int64()).cast(pa.string())
    text = [pa.array(np.arange(items.num_rows)).cast(pa.string()),
            items.column("predicted_class").cast(pa.string()), items.column("classes").cast(pa.string()),
            pa.array([json.dumps(t) for t in names], pa.string()).take(tier_of_item), needed, needed]
    tails = pc.binary_join_element_wise('"', scores, f'","{at}",', *_interleave(text, ","), ',"open",0,0,{},{}]', "")
    return [p.blob, at, json.dumps(p.ids), json.dumps(names), json.dumps(tier_of_item.to_pylist()),
            json.dumps(scores.to_pylist()), json.dumps(tails.to_pylist())]


def _interleave(values: list, separator: str) -> list:
    out = [values[0]]
    for value in values[1:]:
        out += [separator, value]
    return out


def _verdicts(records: list[bytes]) -> list[Verdict]:
    """Verdicts from their stored records (a sequence-number prefix, then JSON), oldest first."""
    out = []
    for member in sorted(records):
        item_id, label, reviewer, tier, action, ts, _, _ = json.loads(member[16:])
        out.append(Verdict(item_id, label, reviewer, tier, action, math.nan if ts is None else ts))
    return out


def _verdict_key(tier: str, reviewer: str) -> str:
    """The field of a verdict in its item's ``v:S`` hash: one per (tier, reviewer), unambiguous
    whatever the names hold (the tier's length in UTF-8 bytes first)."""
    return f"{len(tier.encode())}:{tier}{reviewer}"
