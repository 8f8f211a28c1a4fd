-- PAUSE: ARGV[10] the pause (µs). Returns the state.
paused = math.max(paused, now + tonumber(ARGV[10]))
save()
return state()
