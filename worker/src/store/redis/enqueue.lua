-- Inserts jobs of one queue. ARGV: base, jobs channel, queue, created_at, then ten per job:
-- id, kind, args, priority, max_attempts, run_at, idempotency key ('' for none), tags,
-- metadata, state. Returns the ids that already existed (nothing is written for those).
local taken = {}
local ready = false
local n = (#ARGV - 4) / 10
for i = 0, n - 1 do
  local o = 5 + i * 10
  local id = ARGV[o]
  local k = jkey(id)
  if redis.call('EXISTS', k) == 1 then
    taken[#taken + 1] = id
  else
    local state = ARGV[o + 9]
    local h = { priority = ARGV[o + 3], run_at = ARGV[o + 5], idempotency_key = ARGV[o + 6] }
    redis.call('HSET', k, 'id', id, 'queue', ARGV[3], 'kind', ARGV[o + 1], 'args', ARGV[o + 2],
      'priority', h.priority, 'state', state, 'attempt', '0', 'max_attempts', ARGV[o + 4],
      'run_at', h.run_at, 'created_at', ARGV[4], 'tags', ARGV[o + 7], 'metadata', ARGV[o + 8],
      'attempts', '[]')
    if h.idempotency_key ~= '' then
      redis.call('HSET', k, 'idempotency_key', h.idempotency_key)
    end
    index(id, state, h)
    if state == 'available' then
      ready = true
    end
  end
end
if ready then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return taken
