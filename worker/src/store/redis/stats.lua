-- Counts per state (in the order of ARGV[2..8]), the run_at of the oldest job ready now ('' when
-- none) and now, all as strings; now is the store's clock. The ready set sorts by priority first, so its
-- oldest job is the oldest head among the priority bands; at most 64 bands are looked at.
local now = fmt(store_now())
local out = {}
for i = 2, 8 do
  out[#out + 1] = tostring(redis.call('ZCARD', state_set(ARGV[i])))
end
local oldest = nil
local d = redis.call('ZRANGEBYSCORE', base .. ':delayed', '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
if #d > 0 then
  oldest = tonumber(redis.call('HGET', jkey(d[1]), 'run_at') or d[2])
end
local lo = '-inf'
for _ = 1, 64 do
  local r = redis.call('ZRANGEBYSCORE', base .. ':ready', lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #r == 0 then
    break
  end
  local run_at = redis.call('HGET', jkey(r[1]), 'run_at')
  if run_at and (not oldest or tonumber(run_at) < oldest) then
    oldest = tonumber(run_at)
  end
  lo = fmt((math.floor(tonumber(r[2]) / 1e13) + 1) * 1e13)
end
out[#out + 1] = oldest and fmt(oldest) or ''
out[#out + 1] = now
return out
