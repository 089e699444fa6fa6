-- Inserts jobs of one queue. ARGV: base, jobs channel, queue, created_at, then ten per job:
-- id, kind, args, priority, max_attempts, run_at, idempotency key, tags, metadata, state.
-- An empty key, tags or metadata is not stored (readers take none, [] and {}); neither are
-- the id and queue, which the key names. Returns the ids that already existed (nothing is
-- written for those).
local taken = {}
local ready = false
local b = batch()
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
    local set = { 'kind', ARGV[o + 1], 'args', ARGV[o + 2], 'priority', h.priority,
      'state', state, 'attempt', '0', 'max_attempts', ARGV[o + 4], 'run_at', h.run_at,
      'created_at', ARGV[4] }
    if h.idempotency_key ~= '' then
      set[#set + 1] = 'idempotency_key'
      set[#set + 1] = h.idempotency_key
    end
    if ARGV[o + 7] ~= '' then
      set[#set + 1] = 'tags'
      set[#set + 1] = ARGV[o + 7]
    end
    if ARGV[o + 8] ~= '' then
      set[#set + 1] = 'metadata'
      set[#set + 1] = ARGV[o + 8]
    end
    redis.call('HSET', k, unpack(set))
    b:index(id, state, h)
    if state == 'available' then
      ready = true
    end
  end
end
b:flush()
if ready then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return taken
