-- Applies attempt outcomes. ARGV: base, jobs channel, queue, guard, then eight per outcome:
-- id, attempt, state, run_at ('' keeps it), finalized_at ('' clears it), attempt delta,
-- attempt record (JSON), result (JSON; '' keeps the field). An outcome applies only if the job is running at that attempt, and,
-- when guard is set, only if its lease expired before guard (the rescuer's check).
-- Returns the ids it applied to.
local guard = ARGV[4]
local prefix = base .. ':job:'
local applied = {}
-- The index changes are collected and sent as one command per set: the running job leaves
-- `leases` and its worker's set; it enters its new state's sets.
local owners = {}
local adds, order = {}, {}
local function add(key, score, id)
  local l = adds[key]
  if not l then
    l = {}
    adds[key] = l
    order[#order + 1] = key
  end
  l[#l + 1] = score
  l[#l + 1] = id
end
local keys = {}
local function key_of(name)
  local k = keys[name]
  if not k then
    k = base .. ':' .. name
    keys[name] = k
  end
  return k
end
local ready = false
for o = 5, #ARGV, 8 do
  local id, state, run_at, fin, delta, rec =
    ARGV[o], ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], ARGV[o + 5], ARGV[o + 6]
  local k = prefix .. id
  local v = redis.call('HMGET', k, 'state', 'attempt', 'lease_owner', 'lease_expires_at',
    'idempotency_key', 'priority', 'run_at')
  if v[1] == 'running' and v[2] == ARGV[o + 1]
    and (guard == '' or (v[4] and tonumber(v[4]) < tonumber(guard))) then
    applied[#applied + 1] = id
    local owner = v[3]
    if owner then
      local l = owners[owner]
      if not l then
        l = {}
        owners[owner] = l
      end
      l[#l + 1] = id
    end
    redis.call('APPEND', hist_key(id), rec .. '\n')
    if fin ~= '' and run_at == '' and delta == '0' then
      -- A finished attempt, the common case.
      redis.call('HSET', k, 'state', state, 'finalized_at', fin)
      redis.call('HDEL', k, 'lease_owner', 'lease_expires_at', 'cancel_requested_at')
    else
      local set = { 'state', state }
      if run_at ~= '' then
        set[#set + 1] = 'run_at'
        set[#set + 1] = run_at
      end
      if fin ~= '' then
        set[#set + 1] = 'finalized_at'
        set[#set + 1] = fin
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
    end
    if ARGV[o + 7] ~= '' then
      redis.call('HSET', k, 'result', ARGV[o + 7])
    end
    if run_at == '' then
      run_at = v[7]
    end
    add(key_of('s:' .. state), 0, id)
    if state == 'available' then
      add(key_of('ready'), ready_score(v[6], run_at), id)
      ready = true
    elseif state == 'scheduled' or state == 'retryable' then
      add(key_of('delayed'), run_at, id)
    else
      add(key_of((v[5] and 'fink:' or 'fin:') .. state), fin, id)
    end
  end
end
if #applied > 0 then
  bulk('ZREM', base .. ':leases', applied)
  for owner, ids in pairs(owners) do
    bulk('SREM', base .. ':w:' .. owner, ids)
  end
  for _, key in ipairs(order) do
    bulk('ZADD', key, adds[key])
  end
end
if ready then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return applied
