-- RESERVE: ARGV[10..13] cost per bucket, ARGV[14] the allowed wait (µs).
-- Returns {1, cost, capacity} (over capacity), {2, wait} (throttled), or
-- {0, wait, seq, prev_floor, tat_before x4, tat_after x4, epoch x4, state x7}.
local at = math.max(now, floor, paused)
local cost = {}
for i = 1, 4 do
  cost[i] = tonumber(ARGV[9 + i])
  if cap[i] > 0 then
    if cost[i] > cap[i] then
      return {1, cost[i], cap[i]}
    end
    at = math.max(at, tat[i] - math.floor((cap[i] - cost[i]) * upu[i]))
  end
end
local wait = at - now
if wait > tonumber(ARGV[14]) then
  return {2, wait}
end
local r = {0, wait, 0, floor, tat[1], tat[2], tat[3], tat[4]}
for i = 1, 4 do
  if cap[i] > 0 then
    if at > tat[i] then
      ep[i] = ep[i] + 1
    end
    tat[i] = math.max(tat[i], at) + refill(i, cost[i])
  end
end
floor = at
seq = seq + 1
r[3] = seq
for i = 1, 4 do
  r[8 + i] = tat[i]
  r[12 + i] = ep[i]
end
save()
for _, v in ipairs(state()) do
  r[#r + 1] = v
end
return r
