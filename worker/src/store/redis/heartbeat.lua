-- Renews the leases of the listed jobs (ARGV[4...]) that run under worker ARGV[2] on this
-- queue for ARGV[3] µs from the store's clock; returns the ids among them whose cancellation
-- was requested. A listed job that no longer runs under this worker (finished, rescued) is
-- left alone, and a job of this worker that is not listed is not renewed.
local worker, until_ = ARGV[2], fmt(store_now() + tonumber(ARGV[3]))
local cancel = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local h = load(id)
  if h and h.state == 'running' and h.lease_owner == worker then
    redis.call('HSET', jkey(id), 'lease_expires_at', until_)
    redis.call('ZADD', base .. ':leases', until_, id)
    if h.cancel_requested_at then
      cancel[#cancel + 1] = id
    end
  end
end
return cancel
