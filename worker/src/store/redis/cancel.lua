-- Cancels job ARGV[3] at the store's clock: at once from FROM.cancel_at_once (the waiting
-- states), by flagging it and telling its worker on channel ARGV[2] from
-- FROM.cancel_by_request (running). Returns {'cancelled'}, {'requested'}, {'missing'} or
-- {'wrong', state}.
local id, now = ARGV[3], fmt(store_now())
local h = load(id)
if not h then
  return { 'missing' }
end
if FROM.cancel_at_once[h.state] then
  unindex(id, h.state, h)
  redis.call('HSET', jkey(id), 'state', 'cancelled', 'finalized_at', now)
  h.finalized_at = now
  index(id, 'cancelled', h)
  return { 'cancelled' }
end
if FROM.cancel_by_request[h.state] then
  if not h.cancel_requested_at then
    redis.call('HSET', jkey(id), 'cancel_requested_at', now)
  end
  redis.call('PUBLISH', ARGV[2], id)
  return { 'requested' }
end
return { 'wrong', h.state }
