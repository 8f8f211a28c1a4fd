-- Shared by every portcullis-redis script: the chain of the in-memory store (see the `gcra`
-- module of portcullis-layers), in one hash per key:
--   t1..t4, floor   the tail: each bucket's theoretical arrival time (µs, server clock) and the
--                   FIFO floor, after every live reservation
--   b1..b4, bfloor  the base: the same, before the first live reservation
--   paused          admissions paused until this instant (after a 429)
--   seq             the latest reservation's number; last: the last live one's (0: none)
--   L<seq>          a live reservation (a link): release, at, owner, token, frozen, its cost per
--                   bucket, then the step after it (4 froms, 4 adds, floor)
-- A missing field takes its fresh value; seq starts at `now`, so a ticket from before the key
-- expired never matches a fresh key.
-- KEYS[1] the hash; ARGV[1] idle margin (ms); ARGV[2..5] capacities (0: no bucket);
-- ARGV[6..9] µs to refill one unit. Script arguments start at ARGV[10].
local key = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
-- A key of another type (overwritten by hand or by another program) is replaced: it would
-- fail every call to it with WRONGTYPE, and never expire.
local kind = redis.call('TYPE', key)
kind = kind.ok or kind
if kind ~= 'hash' and kind ~= 'none' then
  redis.log(redis.LOG_WARNING, 'portcullis: ' .. key .. ' held a ' .. kind .. ', not a hash; replaced')
  redis.call('DEL', key)
end
-- Values read back are input like any other: a field that is not a finite number within two
-- centuries of now (nan, inf, 1e400, garbage) takes its fresh value, and is written back so.
local BOUND = 6.3e15
local function sane(v, fresh)
  local n = tonumber(v)
  if n == nil or n ~= n or n < now - BOUND or n > now + BOUND then
    return fresh
  end
  return n
end
local margin = tonumber(ARGV[1])
local cap, upu = {}, {}
for i = 1, 4 do
  cap[i] = tonumber(ARGV[1 + i])
  upu[i] = tonumber(ARGV[5 + i])
end
local s = redis.call('HMGET', key, 't1', 't2', 't3', 't4', 'floor', 'b1', 'b2', 'b3', 'b4', 'bfloor',
  'paused', 'seq', 'last')
local tail, base = {t = {}}, {t = {}}
for i = 1, 4 do
  tail.t[i] = sane(s[i], now)
  base.t[i] = sane(s[5 + i], now)
end
tail.floor = sane(s[5], now)
base.floor = sane(s[10], now)
local paused = sane(s[11], 0)
local seq = sane(s[12], now)
local last = sane(s[13], 0)

-- Time to refill `units`, rounded up (charging more is the safe side).
local function refill(i, units)
  return math.ceil(units * upu[i])
end

local function int(x)
  return string.format('%.0f', x)
end

-- A step `tat -> max(tat, f) + a` per bucket, and the floor raised to `floor`.
local function identity()
  return {f = {0, 0, 0, 0}, a = {0, 0, 0, 0}, floor = 0}
end

-- `cost` charged at `at`.
local function admission(cost, at)
  local st = identity()
  st.floor = at
  for i = 1, 4 do
    if cap[i] > 0 then
      st.f[i] = at
      st.a[i] = refill(i, cost[i])
    end
  end
  return st
end

local function apply(st, p)
  local q = {t = {}, floor = math.max(p.floor, st.floor)}
  for i = 1, 4 do
    q.t[i] = math.max(p.t[i], st.f[i]) + st.a[i]
  end
  return q
end

-- `x`, then `y`, as one step.
local function compose(x, y)
  local z = identity()
  z.floor = math.max(x.floor, y.floor)
  for i = 1, 4 do
    z.f[i] = math.max(x.f[i], y.f[i] - x.a[i])
    z.a[i] = x.a[i] + y.a[i]
  end
  return z
end

-- The earliest slot for `cost` after the chain at `p`, not before `release`.
local function slot(p, cost, release)
  local at = math.max(release, p.floor)
  for i = 1, 4 do
    if cap[i] > 0 then
      at = math.max(at, p.t[i] - math.floor((cap[i] - cost[i]) * upu[i]))
    end
  end
  return at
end

-- A link, or nil when its field is corrupt (not 18 finite numbers within bounds).
local function decode(sq, v)
  local n = {}
  for x in string.gmatch(v, '[^,]+') do
    local num = tonumber(x)
    if num == nil or num ~= num or num < -BOUND - now or num > BOUND + now then
      return nil
    end
    n[#n + 1] = num
  end
  if sq == nil or #n ~= 18 then
    return nil
  end
  return {seq = sq, release = n[1], at = n[2], owner = n[3], token = n[4], frozen = n[5],
    cost = {n[6], n[7], n[8], n[9]},
    after = {f = {n[10], n[11], n[12], n[13]}, a = {n[14], n[15], n[16], n[17]}, floor = n[18]}}
end

local function store_link(l)
  local v = {l.release, l.at, l.owner, l.token, l.frozen}
  for i = 1, 4 do v[5 + i] = l.cost[i] end
  for i = 1, 4 do v[9 + i] = l.after.f[i] end
  for i = 1, 4 do v[13 + i] = l.after.a[i] end
  v[18] = l.after.floor
  for j = 1, #v do v[j] = int(v[j]) end
  redis.call('HSET', key, 'L' .. int(l.seq), table.concat(v, ','))
end

-- Every live reservation, in order.
local function load_links()
  local all = redis.call('HGETALL', key)
  local links = {}
  for j = 1, #all, 2 do
    if string.byte(all[j], 1) == 76 then -- 'L'
      local l = decode(tonumber(string.sub(all[j], 2)), all[j + 1])
      if l then
        links[#links + 1] = l
      else
        -- A corrupt link is dropped: its charge stays in the chain's tail.
        redis.call('HDEL', key, all[j])
      end
    end
  end
  table.sort(links, function(x, y) return x.seq < y.seq end)
  return links
end

-- Appends `st` to the chain: after the last live reservation, or to the base.
local function push(st)
  if last ~= 0 then
    local v = redis.call('HGET', key, 'L' .. int(last))
    local l = v and decode(last, v)
    if l then
      l.after = compose(l.after, st)
      store_link(l)
    else
      base = apply(st, base)
    end
  else
    base = apply(st, base)
  end
  tail = apply(st, tail)
end

local function save()
  redis.call('HSET', key,
    't1', int(tail.t[1]), 't2', int(tail.t[2]), 't3', int(tail.t[3]), 't4', int(tail.t[4]),
    'floor', int(tail.floor),
    'b1', int(base.t[1]), 'b2', int(base.t[2]), 'b3', int(base.t[3]), 'b4', int(base.t[4]),
    'bfloor', int(base.floor), 'paused', int(paused), 'seq', int(seq), 'last', int(last))
  -- Idle keys expire once every bucket is full again and no pause or queue is left, plus a margin.
  local t = tail.t
  local idle = math.max(tail.floor, paused, t[1], t[2], t[3], t[4])
  -- (At most 1e10 ms: absurdly slow rates must not overflow the expiry.)
  redis.call('PEXPIRE', key, math.min(math.ceil((idle - now) / 1000) + margin, 1e10))
end

-- now, floor, paused, t1..t4: what the client caches to show levels.
local function state()
  return {now, tail.floor, paused, tail.t[1], tail.t[2], tail.t[3], tail.t[4]}
end
