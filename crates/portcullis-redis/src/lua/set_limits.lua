-- SET_LIMITS: ARGV[10..13] new capacities, ARGV[14..17] new µs per unit (ARGV[2..9] are the old
-- limits). Keeps each level (debt included), capped by the new capacity, and starts a new chain:
-- the live reservations keep their slots and their charges. Returns the state.
for i = 1, 4 do
  local nc, nu = tonumber(ARGV[9 + i]), tonumber(ARGV[13 + i])
  local t = tail.t[i]
  if cap[i] > 0 and nc > 0 then
    local level = cap[i]
    if t > now then
      level = cap[i] - (t - now) / upu[i]
    end
    local missing = math.max(0, cap[i] - level) - (cap[i] - nc)
    tail.t[i] = now + math.ceil(math.max(0, missing) * nu)
  else
    tail.t[i] = math.max(now, t)
  end
  cap[i], upu[i] = nc, nu
end
base = {t = {tail.t[1], tail.t[2], tail.t[3], tail.t[4]}, floor = tail.floor}
for _, l in ipairs(load_links()) do
  l.frozen = 1
  l.after = identity()
  store_link(l)
end
save()
return state()
