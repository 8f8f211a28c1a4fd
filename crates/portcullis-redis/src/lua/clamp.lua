-- CLAMP: ARGV[10..13] what remains per bucket (-1: unknown). Lowers levels, never raises them.
-- Returns the state.
for i = 1, 4 do
  local rem = tonumber(ARGV[9 + i])
  if cap[i] > 0 and rem >= 0 then
    local t = now + refill(i, math.max(0, cap[i] - rem))
    if t > tat[i] then
      tat[i] = t
      ep[i] = ep[i] + 1
    end
  end
end
save()
return state()
