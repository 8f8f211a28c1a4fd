-- SETTLE: ARGV[10] 1 if cancelled, ARGV[11] the ticket's seq, ARGV[12] its prev_floor,
-- ARGV[13..16] reserved cost, ARGV[17..20] actual cost, ARGV[21..24] tat before,
-- ARGV[25..28] tat after, ARGV[29..32] epochs. Returns the state.
local tseq = tonumber(ARGV[11])
local tail = ARGV[10] == '1' and seq == tseq
local changed = false
for i = 1, 4 do
  if cap[i] > 0 then
    local c, a = tonumber(ARGV[12 + i]), tonumber(ARGV[16 + i])
    local before, after, epoch = tonumber(ARGV[20 + i]), tonumber(ARGV[24 + i]), tonumber(ARGV[28 + i])
    if a > c then
      -- An overrun: consumed now.
      if now > tat[i] then
        ep[i] = ep[i] + 1
      end
      tat[i] = math.max(tat[i], now) + refill(i, a - c)
      changed = true
    elseif a < c and ep[i] == epoch then
      local refund
      if tail then
        refund = after - before
      else
        refund = math.min(refill(i, c - a), math.max(0, after - floor))
      end
      tat[i] = tat[i] - refund
      changed = true
    end
  end
end
if tail then
  floor = tonumber(ARGV[12])
  seq = tseq - 1
  changed = true
end
if changed then
  save()
end
return state()
