-- Renews the leases of every job ARGV[2] runs on this queue for ARGV[3] µs from the store's
-- clock; returns the ids among them whose cancellation was requested.
local worker, until_ = ARGV[2], fmt(store_now() + tonumber(ARGV[3]))
local set = base .. ':w:' .. worker
local cancel = {}
for _, id in ipairs(redis.call('SMEMBERS', set)) do
  local h = load(id)
  if h and h.state == 'running' and h.lease_owner == worker then
    redis.call('HSET', jkey(id), 'lease_expires_at', until_)
    redis.call('ZADD', base .. ':leases', until_, id)
    if h.cancel_requested_at then
      cancel[#cancel + 1] = id
    end
  else
    redis.call('SREM', set, id)
  end
end
return cancel
