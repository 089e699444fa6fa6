-- Deletes up to ARGV[2] finished jobs finalized before their cutoff. ARGV[3..5]: cutoffs for
-- completed, cancelled, dead; ARGV[6..8]: the same for jobs that hold an idempotency key.
-- Returns two strings per deleted job: its id and its key ('' for none).
local sets = { 'fin:completed', 'fin:cancelled', 'fin:dead', 'fink:completed', 'fink:cancelled',
  'fink:dead' }
local left = tonumber(ARGV[2])
local out = {}
for i, s in ipairs(sets) do
  if left <= 0 then
    break
  end
  local zset = base .. ':' .. s
  local ids = redis.call('ZRANGEBYSCORE', zset, '-inf', '(' .. ARGV[2 + i], 'LIMIT', 0, left)
  for _, id in ipairs(ids) do
    local h = load(id)
    redis.call('ZREM', zset, id)
    if h then
      unindex(id, h.state, h)
      redis.call('DEL', jkey(id), hist_key(id))
      out[#out + 1] = id
      out[#out + 1] = h.idempotency_key or ''
      left = left - 1
    end
  end
end
return out
