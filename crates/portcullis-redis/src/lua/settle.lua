-- SETTLE: ARGV[10] how it ends (0 cancelled, 1 used, 2 kept unsettled, 3 forgotten: the caller
-- gave up before the reply of its reservation), ARGV[11] the reservation's seq (its token for 3),
-- ARGV[12] the caller's owner id, ARGV[13..16] its estimate, ARGV[17..20] the actual cost.
-- Returns the state, then (seq, new slot) for each reservation of this owner that moved earlier.
local kind, id, owner = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local estimate, actual = {}, {}
for i = 1, 4 do
  estimate[i] = tonumber(ARGV[12 + i])
  actual[i] = tonumber(ARGV[16 + i])
end
if kind == 2 then
  actual = estimate
end
local links = load_links()

-- Removes link `j`, folding `st` (what it keeps) and the step after it into the chain.
local function remove(j, st)
  local l = table.remove(links, j)
  redis.call('HDEL', key, 'L' .. int(l.seq))
  local merged = compose(st, l.after)
  if j > 1 then
    links[j - 1].after = compose(links[j - 1].after, merged)
    links[j - 1].dirty = true
  else
    base = apply(merged, base)
  end
  return l
end

local function kept(l, cost)
  if l.frozen == 1 then
    return identity()
  end
  local c = {}
  for i = 1, 4 do
    c[i] = math.min(cost[i], l.cost[i])
  end
  return admission(c, l.at)
end

-- Reservations whose callers went away without a word (a crashed client) keep their charge and
-- leave the chain once their slot is older than the idle margin.
local j = 1
while j <= #links do
  if links[j].at + margin * 1000 < now then
    local l = links[j]
    remove(j, kept(l, l.cost))
  else
    j = j + 1
  end
end

-- An overrun: consumed now, after everything already scheduled.
if kind == 1 then
  local over, any = identity(), false
  for i = 1, 4 do
    if cap[i] > 0 and actual[i] > estimate[i] then
      over.f[i] = now
      over.a[i] = refill(i, actual[i] - estimate[i])
      any = true
    end
  end
  if any then
    if #links > 0 then
      links[#links].after = compose(links[#links].after, over)
      links[#links].dirty = true
    else
      base = apply(over, base)
    end
    tail = apply(over, tail)
  end
end

local found
for k, l in ipairs(links) do
  if (kind == 3 and l.owner == owner and l.token == id) or (kind ~= 3 and l.seq == id) then
    found = k
  end
end
local moved = {}
if found then
  if kind == 0 or kind == 3 then
    remove(found, identity())
  else
    remove(found, kept(links[found], actual))
  end
  -- Reschedule: this owner's waiters not yet due take the earliest slot the chain before them
  -- now gives (never later); other owners' waiters cannot be told, so they keep theirs.
  local p = base
  for _, l in ipairs(links) do
    if l.frozen == 0 then
      if l.at > now and l.owner == owner then
        if l.release < now then
          l.release = now
          l.dirty = true
        end
        local at = slot(p, l.cost, l.release)
        if at < l.at then
          l.at = at
          l.dirty = true
          moved[#moved + 1] = l.seq
          moved[#moved + 1] = at
        end
      end
      p = apply(admission(l.cost, l.at), p)
    end
    p = apply(l.after, p)
  end
  tail = p
end
for _, l in ipairs(links) do
  if l.dirty then
    store_link(l)
  end
end
if #links > 0 then
  last = links[#links].seq
else
  last = 0
end
save()
local r = state()
for _, v in ipairs(moved) do
  r[#r + 1] = v
end
return r
