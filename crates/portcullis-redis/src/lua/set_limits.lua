-- SET_LIMITS: ARGV[10..13] new capacities, ARGV[14..17] new µs per unit (ARGV[2..9] are the old
-- limits). Keeps each level (debt included), capped by the new capacity. Returns the state.
for i = 1, 4 do
  local nc, nu = tonumber(ARGV[9 + i]), tonumber(ARGV[13 + i])
  if cap[i] > 0 and nc > 0 then
    local level = cap[i]
    if tat[i] > now then
      level = cap[i] - (tat[i] - now) / upu[i]
    end
    local missing = math.max(0, cap[i] - level) - (cap[i] - nc)
    tat[i] = now + math.ceil(math.max(0, missing) * nu)
  else
    tat[i] = math.max(now, tat[i])
  end
  ep[i] = ep[i] + 1
  cap[i], upu[i] = nc, nu
end
save()
return state()
