-- Applies attempt outcomes. ARGV: base, jobs channel, queue, guard, then seven per outcome:
-- id, attempt, state, run_at ('' keeps it), finalized_at ('' clears it), attempt delta,
-- attempt record (JSON). An outcome applies only if the job is running at that attempt, and,
-- when guard is set, only if its lease expired before guard (the rescuer's check).
-- Returns the ids it applied to.
local guard = ARGV[4]
local applied = {}
local ready = false
local n = (#ARGV - 4) / 7
for i = 0, n - 1 do
  local o = 5 + i * 7
  local id, state, run_at, fin, delta, rec =
    ARGV[o], ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], ARGV[o + 5], ARGV[o + 6]
  local h = load(id)
  if h and h.state == 'running' and h.attempt == ARGV[o + 1]
    and (guard == '' or (h.lease_expires_at and tonumber(h.lease_expires_at) < tonumber(guard))) then
    unindex(id, 'running', h)
    local k = jkey(id)
    local history = redis.call('HGET', k, 'attempts')
    if not history or history == '[]' then
      history = '[' .. rec .. ']'
    else
      history = string.sub(history, 1, -2) .. ',' .. rec .. ']'
    end
    redis.call('HSET', k, 'state', state, 'attempts', history)
    redis.call('HDEL', k, 'lease_owner', 'lease_expires_at', 'cancel_requested_at')
    if run_at ~= '' then
      redis.call('HSET', k, 'run_at', run_at)
      h.run_at = run_at
    end
    if fin ~= '' then
      redis.call('HSET', k, 'finalized_at', fin)
      h.finalized_at = fin
    else
      redis.call('HDEL', k, 'finalized_at')
    end
    if delta ~= '0' then
      redis.call('HINCRBY', k, 'attempt', delta)
    end
    index(id, state, h)
    if state == 'available' then
      ready = true
    end
    applied[#applied + 1] = id
  end
end
if ready then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return applied
