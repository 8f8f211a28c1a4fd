-- RESERVE: ARGV[10..13] cost per bucket, ARGV[14] the allowed wait (µs), ARGV[15] the caller's
-- owner id, ARGV[16] its token for this reservation (to forget it if the caller gives up before
-- the reply). Returns {1, cost, capacity} (over capacity), {2, wait} (throttled), or
-- {0, wait, seq, state x7}.
local cost = {}
for i = 1, 4 do
  cost[i] = tonumber(ARGV[9 + i])
  if cap[i] > 0 and cost[i] > cap[i] then
    return {1, cost[i], cap[i]}
  end
end
local release = math.max(now, paused)
local at = slot(tail, cost, release)
local wait = at - now
if wait > tonumber(ARGV[14]) then
  return {2, wait}
end
tail = apply(admission(cost, at), tail)
seq = seq + 1
last = seq
store_link({seq = seq, release = release, at = at, owner = tonumber(ARGV[15]),
  token = tonumber(ARGV[16]), frozen = 0, cost = cost, after = identity()})
save()
local r = {0, wait, seq}
for _, v in ipairs(state()) do
  r[#r + 1] = v
end
return r
