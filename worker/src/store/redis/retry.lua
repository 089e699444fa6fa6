-- Makes each listed job that retry may start from (FROM.retry) available now (the store's
-- clock) with a fresh attempt budget. ARGV: base, jobs channel, queue, ids... Returns one
-- answer per id: 'ok', 'missing', or the state that refused it.
local now = fmt(store_now())
local out = {}
local ready = false
for i = 4, #ARGV do
  local id = ARGV[i]
  local h = load(id)
  if not h then
    out[#out + 1] = 'missing'
  elseif not FROM.retry[h.state] then
    out[#out + 1] = h.state
  else
    unindex(id, h.state, h)
    local k = jkey(id)
    redis.call('HSET', k, 'state', 'available', 'attempt', '0', 'run_at', now)
    redis.call('HDEL', k, 'finalized_at', 'lease_owner', 'lease_expires_at', 'cancel_requested_at',
      'result', 'progress')
    h.run_at = now
    index(id, 'available', h)
    ready = true
    out[#out + 1] = 'ok'
  end
end
if ready then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return out
