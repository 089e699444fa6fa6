-- Up to ARGV[3] running jobs whose lease expired before ARGV[2], six strings each: id,
-- attempt, max_attempts, attempted_at, lease_owner, cancel_requested_at ('' when unset).
local ids = redis.call('ZRANGEBYSCORE', base .. ':leases', '-inf', '(' .. ARGV[2], 'LIMIT', 0,
  tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local h = load(id)
  if h and h.state == 'running' then
    out[#out + 1] = id
    out[#out + 1] = h.attempt
    out[#out + 1] = h.max_attempts
    out[#out + 1] = h.attempted_at or ''
    out[#out + 1] = h.lease_owner or ''
    out[#out + 1] = h.cancel_requested_at or ''
  else
    redis.call('ZREM', base .. ':leases', id)
  end
end
return out
