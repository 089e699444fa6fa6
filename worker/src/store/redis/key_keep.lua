-- Confirms a claim: the key now lives as long as its job. Only if ARGV[1] still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PERSIST', KEYS[1])
end
return 0
