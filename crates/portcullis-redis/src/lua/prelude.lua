-- Shared by every portcullis-redis script. One hash per key:
--   t1..t4  each bucket's theoretical arrival time (µs, server clock): the instant it is full again
--   e1..e4  each bucket's epoch (a refund returns nothing across an epoch change)
--   floor   the latest admission instant (FIFO floor)
--   paused  admissions paused until this instant (after a 429)
--   seq     the latest reservation's number
-- A missing field takes its fresh value; epochs and seq start at `now`, so a ticket from before
-- the key expired never matches a fresh key.
-- KEYS[1] the hash; ARGV[1] idle margin (ms); ARGV[2..5] capacities (0: no bucket);
-- ARGV[6..9] µs to refill one unit. Script arguments start at ARGV[10].
local key = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local margin = tonumber(ARGV[1])
local cap, upu = {}, {}
for i = 1, 4 do
  cap[i] = tonumber(ARGV[1 + i])
  upu[i] = tonumber(ARGV[5 + i])
end
local s = redis.call('HMGET', key, 't1', 't2', 't3', 't4', 'e1', 'e2', 'e3', 'e4', 'floor', 'paused', 'seq')
local tat, ep = {}, {}
for i = 1, 4 do
  tat[i] = tonumber(s[i]) or now
  ep[i] = tonumber(s[4 + i]) or now
end
local floor = tonumber(s[9]) or now
local paused = tonumber(s[10]) or 0
local seq = tonumber(s[11]) or now

-- Time to refill `units`, rounded up (charging more is the safe side).
local function refill(i, units)
  return math.ceil(units * upu[i])
end

local function int(x)
  return string.format('%.0f', x)
end

local function save()
  redis.call('HSET', key,
    't1', int(tat[1]), 't2', int(tat[2]), 't3', int(tat[3]), 't4', int(tat[4]),
    'e1', int(ep[1]), 'e2', int(ep[2]), 'e3', int(ep[3]), 'e4', int(ep[4]),
    'floor', int(floor), 'paused', int(paused), 'seq', int(seq))
  -- Idle keys expire once every bucket is full again and no pause or queue is left, plus a margin.
  local last = math.max(floor, paused, tat[1], tat[2], tat[3], tat[4])
  -- (At most 1e10 ms: absurdly slow rates must not overflow the expiry.)
  redis.call('PEXPIRE', key, math.min(math.ceil((last - now) / 1000) + margin, 1e10))
end

-- now, floor, paused, t1..t4: what the client caches to show levels.
local function state()
  return {now, floor, paused, tat[1], tat[2], tat[3], tat[4]}
end
