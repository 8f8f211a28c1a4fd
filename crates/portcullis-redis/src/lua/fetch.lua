-- FETCH: the state, read only.
return state()
