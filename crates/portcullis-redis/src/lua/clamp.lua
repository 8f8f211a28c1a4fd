-- CLAMP: ARGV[10..13] what remains per bucket (-1: unknown). Lowers levels from now on, never
-- raises them. Returns the state.
local st = identity()
for i = 1, 4 do
  local rem = tonumber(ARGV[9 + i])
  if cap[i] > 0 and rem >= 0 then
    st.f[i] = now + refill(i, math.max(0, cap[i] - rem))
  end
end
push(st)
save()
return state()
