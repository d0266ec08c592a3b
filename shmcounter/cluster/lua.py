"""The cluster's server-side operations: one Lua script each, atomic in Redis.

Every cluster operation is one EVALSHA of one script below: Redis runs a script
to its end before any other command, so each is atomic (the counterpart of an op
under the arena's stop_machine-free atomics). Scripts are loaded once per
connection pool (SCRIPT LOAD) and called by SHA; a server that lost them (a
restart, SCRIPT FLUSH) answers NOSCRIPT, and the call loads them again and
retries once (Scripts.call).

Keys, under the namespace `ns` (docs/design.md, "The cluster on Redis"):

    ns:names            zset   counter name -> creation order
    ns:c:<name>         hash   usage max failcnt watermark parent ("" for a root)
    ns:epoch            hash   host -> its epoch, bumped by every join and reap
    ns:live:<host>      string the host's epoch, with the lease TTL (PX)
    ns:hosts            set    hosts joined and not yet reaped or left
    ns:lease:<host>     hash   counter -> pages the host has charged (real + leased)
    ns:unused:<host>    hash   counter -> the host's unused lease, as it last said
    ns:reaped           list   "host epoch pages why", newest first (100 kept)
    ns:stats            hash   reaped, left, reaped_pages, drains

Every call of a host carries its epoch (the fencing token): the call goes on only
if ns:live:<host> holds that epoch. Otherwise the host is stale: if its liveness
key expired and it was not reaped yet, the same script reaps it (exactly once:
the host leaves ns:hosts in the same atomic step), and the call answers STALE.

Numbers are Lua doubles inside scripts: exact up to 2**53, above CLUSTER_MAX.
"""
from __future__ import annotations

from typing import Any

import redis

# The largest max of a cluster counter (and the default): Lua numbers are doubles.
CLUSTER_MAX = 2**50
STALE = -1                # a fenced call's answer when the epoch is not the live one
REFUSED = 0
OK = 1

_PRELUDE = r"""
local ns = ARGV[1]
local function ckey(name) return ns .. ':c:' .. name end

-- The path of counter `name`, from it to the root (as page_counter walks it).
local function path_of(name)
  local path = {}
  local c = name
  while c and c ~= '' do
    path[#path + 1] = c
    c = redis.call('HGET', ckey(c), 'parent')
  end
  return path
end

-- page_counter_uncharge along `path`: usage -= n at every level, clamped at 0.
local function cancel_path(path, n)
  for i = 1, #path do
    local u = redis.call('HINCRBY', ckey(path[i]), 'usage', -n)
    if u < 0 then redis.call('HSET', ckey(path[i]), 'usage', 0) end
  end
end

-- Uncharge everything `host` charged, drop its lease, bump its epoch and take it
-- out of the live hosts. Exactly once: only a host still in ns:hosts is reaped.
local function retire(host, why)
  if redis.call('SREM', ns .. ':hosts', host) == 0 then return -1 end
  local lkey = ns .. ':lease:' .. host
  local items = redis.call('HGETALL', lkey)
  local total = 0
  for i = 1, #items, 2 do
    local n = tonumber(items[i + 1])
    cancel_path(path_of(items[i]), n)
    total = total + n
  end
  redis.call('DEL', lkey, ns .. ':unused:' .. host, ns .. ':live:' .. host)
  local old = redis.call('HGET', ns .. ':epoch', host)
  redis.call('HINCRBY', ns .. ':epoch', host, 1)
  redis.call('LPUSH', ns .. ':reaped', host .. ' ' .. old .. ' ' .. total .. ' ' .. why)
  redis.call('LTRIM', ns .. ':reaped', 0, 99)
  redis.call('HINCRBY', ns .. ':stats', why, 1)
  redis.call('HINCRBY', ns .. ':stats', why .. '_pages', total)
  return total
end

-- Reap every host whose liveness key expired: {host, pages, host, pages, ...}.
local function reap_expired()
  local out = {}
  for _, host in ipairs(redis.call('SMEMBERS', ns .. ':hosts')) do
    if redis.call('EXISTS', ns .. ':live:' .. host) == 0 then
      out[#out + 1] = host
      out[#out + 1] = retire(host, 'reaped')
    end
  end
  return out
end

-- The fence: true if `host` is live at `epoch`; the liveness TTL is renewed.
-- A host whose key expired is reaped here, if nobody did yet.
local function fence(host, epoch, ttl)
  local live = redis.call('GET', ns .. ':live:' .. host)
  if live == epoch then
    redis.call('PEXPIRE', ns .. ':live:' .. host, ttl)
    return true
  end
  if not live then retire(host, 'reaped') end
  return false
end
"""

# ARGV: ns, name, parent ('' for a root), max. -> 1, or an error.
NEW_COUNTER = _PRELUDE + r"""
local name, parent, max = ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', ckey(name)) == 1 then
  return redis.error_reply('EEXIST a counter named ' .. name .. ' already exists')
end
if parent ~= '' and redis.call('EXISTS', ckey(parent)) == 0 then
  return redis.error_reply('ENOENT no counter named ' .. parent)
end
redis.call('HSET', ckey(name), 'usage', 0, 'max', max, 'failcnt', 0, 'watermark', 0,
           'parent', parent)
redis.call('ZADD', ns .. ':names', redis.call('INCR', ns .. ':seq'), name)
return 1
"""

# ARGV: ns, host, epoch, ttl_ms, name, n.
# page_counter_try_charge of n pages at `name` for `host`, fenced:
# {OK} | {REFUSED, refusing counter} | {STALE}. Speculative add at each level from
# `name` up; the first level over its max gets failcnt + 1, the levels below are
# cancelled. On success the host's lease on `name` grows by n.
CHARGE = _PRELUDE + r"""
local host, epoch, ttl, name, n = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
if not fence(host, epoch, ttl) then return {-1} end
if redis.call('EXISTS', ckey(name)) == 0 then
  return redis.error_reply('ENOENT no counter named ' .. name)
end
local path = path_of(name)
for i = 1, #path do
  local k = ckey(path[i])
  local new = redis.call('HINCRBY', k, 'usage', n)
  if new > tonumber(redis.call('HGET', k, 'max')) then
    redis.call('HINCRBY', k, 'usage', -n)
    redis.call('HINCRBY', k, 'failcnt', 1)
    for j = 1, i - 1 do redis.call('HINCRBY', ckey(path[j]), 'usage', -n) end
    return {0, path[i]}
  end
  if new > tonumber(redis.call('HGET', k, 'watermark')) then
    redis.call('HSET', k, 'watermark', new)
  end
end
redis.call('HINCRBY', ns .. ':lease:' .. host, name, n)
return {1}
"""

# ARGV: ns, host, epoch, ttl_ms, name, n. Uncharge n of the host's lease on
# `name` along the path, fenced: {OK} | {STALE}; an error if the host's lease on
# `name` is below n (nothing changes).
UNCHARGE = _PRELUDE + r"""
local host, epoch, ttl, name, n = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
if not fence(host, epoch, ttl) then return {-1} end
local lkey = ns .. ':lease:' .. host
local held = tonumber(redis.call('HGET', lkey, name) or '0')
if held < n then
  return redis.error_reply('ERANGE host ' .. host .. ' holds ' .. held .. ' of ' .. name
                           .. ', cannot uncharge ' .. n)
end
cancel_path(path_of(name), n)
if held == n then redis.call('HDEL', lkey, name)
else redis.call('HINCRBY', lkey, name, -n) end
return {1}
"""

# ARGV: ns, host, ttl_ms. -> the new epoch. A host whose previous incarnation
# is still live is refused; one expired and not yet reaped is reaped first.
JOIN = _PRELUDE + r"""
local host, ttl = ARGV[2], ARGV[3]
if redis.call('EXISTS', ns .. ':live:' .. host) == 1 then
  return redis.error_reply('EBUSY host ' .. host .. ' is live: leave first, or wait '
                           .. 'for its lease to expire')
end
retire(host, 'reaped')
local epoch = redis.call('HINCRBY', ns .. ':epoch', host, 1)
redis.call('SET', ns .. ':live:' .. host, epoch, 'PX', ttl)
redis.call('SADD', ns .. ':hosts', host)
return epoch
"""

# ARGV: ns, host, epoch, ttl_ms, then pairs (counter, unused lease).
# Renew the host's lease (fenced), record its unused lease, reap every expired
# host: {OK, host, pages, ...} | {STALE}.
HEARTBEAT = _PRELUDE + r"""
local host, epoch, ttl = ARGV[2], ARGV[3], ARGV[4]
if not fence(host, epoch, ttl) then return {-1} end
local ukey = ns .. ':unused:' .. host
redis.call('DEL', ukey)
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] ~= '0' then redis.call('HSET', ukey, ARGV[i], ARGV[i + 1]) end
end
local out = reap_expired()
table.insert(out, 1, 1)
return out
"""

# ARGV: ns. Reap every expired host: {host, pages, ...}.
REAP = _PRELUDE + r"""
return reap_expired()
"""

# ARGV: ns, host, epoch. The host leaves: everything it charged is uncharged
# (its unused lease returned first), its epoch bumped: pages | STALE.
LEAVE = _PRELUDE + r"""
local host, epoch = ARGV[2], ARGV[3]
if redis.call('GET', ns .. ':live:' .. host) ~= epoch then
  if redis.call('EXISTS', ns .. ':live:' .. host) == 0 then retire(host, 'reaped') end
  return -1
end
return retire(host, 'left')
"""

# ARGV: ns, name, max. page_counter_set_max: {OK} | {REFUSED, usage} (EBUSY).
SET_MAX = _PRELUDE + r"""
local name, max = ARGV[2], tonumber(ARGV[3])
local k = ckey(name)
if redis.call('EXISTS', k) == 0 then
  return redis.error_reply('ENOENT no counter named ' .. name)
end
local usage = tonumber(redis.call('HGET', k, 'usage'))
if usage > max then return {0, usage} end
redis.call('HSET', k, 'max', max)
return {1}
"""

# ARGV: ns. One consistent view: {counters, hosts, leases, unused, epochs, reaped,
# stats}, each a flat list (names with their hash fields).
SNAPSHOT = _PRELUDE + r"""
local counters = {}
for _, name in ipairs(redis.call('ZRANGE', ns .. ':names', 0, -1)) do
  counters[#counters + 1] = name
  counters[#counters + 1] = redis.call('HGETALL', ckey(name))
end
local hosts = redis.call('SMEMBERS', ns .. ':hosts')
local leases, unused, live = {}, {}, {}
for _, host in ipairs(hosts) do
  leases[#leases + 1] = host
  leases[#leases + 1] = redis.call('HGETALL', ns .. ':lease:' .. host)
  unused[#unused + 1] = host
  unused[#unused + 1] = redis.call('HGETALL', ns .. ':unused:' .. host)
  live[#live + 1] = host
  live[#live + 1] = redis.call('PTTL', ns .. ':live:' .. host)
end
return {counters, leases, unused, live, redis.call('HGETALL', ns .. ':epoch'),
        redis.call('LRANGE', ns .. ':reaped', 0, -1), redis.call('HGETALL', ns .. ':stats')}
"""

SCRIPTS = {"new_counter": NEW_COUNTER, "charge": CHARGE, "uncharge": UNCHARGE,
           "join": JOIN, "heartbeat": HEARTBEAT, "reap": REAP, "leave": LEAVE,
           "set_max": SET_MAX, "snapshot": SNAPSHOT}


class Scripts:
    """The scripts on one Redis client: loaded once (SCRIPT LOAD), then called by
    SHA. A NOSCRIPT answer (the server restarted or flushed its scripts) loads
    them again and retries the call once."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._sha: dict[str, str] = {}

    def load(self) -> None:
        self._sha = {name: str(self.client.script_load(text))
                     for name, text in SCRIPTS.items()}

    def call(self, name: str, *args: object) -> Any:
        if not self._sha:
            self.load()
        try:
            return self.client.evalsha(self._sha[name], 0, *args)   # type: ignore[arg-type]
        except redis.exceptions.NoScriptError:
            self.load()
            return self.client.evalsha(self._sha[name], 0, *args)   # type: ignore[arg-type]
