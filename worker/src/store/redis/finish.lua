-- Applies attempt outcomes. ARGV: base, jobs channel, queue, guard, then seven per outcome:
-- id, attempt, state, run_at ('' keeps it), finalized_at ('' clears it), attempt delta,
-- attempt record (JSON). An outcome applies only if the job is running at that attempt, and,
-- when guard is set, only if its lease expired before guard (the rescuer's check).
-- Returns the ids it applied to.
local guard = ARGV[4]
local applied = {}
local ready = false
local b = batch()
local n = (#ARGV - 4) / 7
for i = 0, n - 1 do
  local o = 5 + i * 7
  local id, state, run_at, fin, delta, rec =
    ARGV[o], ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], ARGV[o + 5], ARGV[o + 6]
  local k = jkey(id)
  local v = redis.call('HMGET', k, 'state', 'attempt', 'lease_owner', 'lease_expires_at',
    'idempotency_key', 'priority', 'run_at', 'attempts')
  if v[1] == 'running' and v[2] == ARGV[o + 1]
    and (guard == '' or (v[4] and tonumber(v[4]) < tonumber(guard))) then
    local h = { lease_owner = v[3] or nil, idempotency_key = v[5] or nil, priority = v[6],
      run_at = v[7] }
    b:unindex(id, 'running', h)
    local history = v[8]
    if not history or history == '[]' then
      history = '[' .. rec .. ']'
    else
      history = string.sub(history, 1, -2) .. ',' .. rec .. ']'
    end
    local set = { 'state', state, 'attempts', history }
    if run_at ~= '' then
      set[#set + 1] = 'run_at'
      set[#set + 1] = run_at
      h.run_at = run_at
    end
    if fin ~= '' then
      set[#set + 1] = 'finalized_at'
      set[#set + 1] = fin
      h.finalized_at = fin
      redis.call('HDEL', k, 'lease_owner', 'lease_expires_at', 'cancel_requested_at')
    else
      redis.call('HDEL', k, 'lease_owner', 'lease_expires_at', 'cancel_requested_at',
        'finalized_at')
    end
    if delta ~= '0' then
      set[#set + 1] = 'attempt'
      set[#set + 1] = tostring(tonumber(v[2]) + tonumber(delta))
    end
    redis.call('HSET', k, unpack(set))
    b:index(id, state, h)
    if state == 'available' then
      ready = true
    end
    applied[#applied + 1] = id
  end
end
b:flush()
if ready then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return applied
