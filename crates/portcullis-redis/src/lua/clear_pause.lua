-- CLEAR PAUSE: no argument. Ends a pause; reservations already scheduled keep their slots.
paused = 0
save()
return state()
