-- Claims idempotency key KEYS[1] for ARGV[1] (`queue/id`) for ARGV[2] ms, until the insert
-- confirms it. Returns {1, '', 0} when claimed, else {0, holder, remaining ms} (-1: confirmed).
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return { 1, '', 0 }
end
return { 0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1]) }
