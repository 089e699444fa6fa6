-- Shared by every per-queue script. ARGV[1] is the queue's key base, `{prefix:queue}`: every
-- key below starts with it, so one script only ever touches one Redis Cluster slot.
local base = ARGV[1]

-- Exact decimal for an integral double (Lua's default conversion keeps 14 digits only), in
-- plain digits however large: an instant near the latest one kept (18 digits of µs) too.
local function fmt(x)
  return string.format('%.0f', x)
end

-- The store's clock in microseconds, as a string like every time in a job's hash. Every
-- instant another process compares (a claim, a lease's deadline) is taken on this one clock,
-- not on the clock of whichever machine called the script. TIME is allowed in scripts since
-- Redis 5 (scripts replicate their effects).
local function store_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function jkey(id)
  return base .. ':job:' .. id
end

-- The job's attempt history: one JSON record per line, appended as attempts end. It is kept
-- out of the hash so the hash's fields stay short and Redis keeps it in its compact encoding.
local function hist_key(id)
  return base .. ':hist:' .. id
end

-- Ready jobs sort by priority, then run_at in milliseconds (clamped to 13 digits).
local function ready_score(priority, run_at)
  local ms = math.floor(tonumber(run_at) / 1000)
  if ms < 0 then
    ms = 0
  elseif ms > 9999999999999 then
    ms = 9999999999999
  end
  return fmt(tonumber(priority) * 1e13 + ms)
end

-- Finished jobs by finalized_at; keyed ones apart, since they may be kept longer.
local function fin_key(state, key)
  if key and key ~= '' then
    return base .. ':fink:' .. state
  end
  return base .. ':fin:' .. state
end

local FIELDS = {
  'state', 'priority', 'run_at', 'finalized_at', 'idempotency_key', 'lease_expires_at',
  'lease_owner', 'attempt', 'max_attempts', 'attempted_at', 'cancel_requested_at',
}

-- The fields the indexes need, or nil when the job does not exist.
local function load(id)
  local v = redis.call('HMGET', jkey(id), unpack(FIELDS))
  if not v[1] then
    return nil
  end
  local h = {}
  for i, f in ipairs(FIELDS) do
    if v[i] then
      h[f] = v[i]
    end
  end
  return h
end

-- The set that holds every job in `state`: `s:<state>`, or `leases` for running jobs.
local function state_set(state)
  if state == 'running' then
    return base .. ':leases'
  end
  return base .. ':s:' .. state
end

-- Adds a job in `state` to that state's indexes. Running jobs have no `s:` set: `leases`
-- holds exactly them.
local function index(id, state, h)
  if state ~= 'running' then
    redis.call('ZADD', base .. ':s:' .. state, 0, id)
  end
  if state == 'available' then
    redis.call('ZADD', base .. ':ready', ready_score(h.priority, h.run_at), id)
  elseif state == 'scheduled' or state == 'retryable' then
    redis.call('ZADD', base .. ':delayed', h.run_at, id)
  elseif state == 'running' then
    redis.call('ZADD', base .. ':leases', h.lease_expires_at, id)
    redis.call('SADD', base .. ':w:' .. h.lease_owner, id)
  else
    redis.call('ZADD', fin_key(state, h.idempotency_key), h.finalized_at, id)
  end
end

-- Removes a job from the indexes of `state`.
local function unindex(id, state, h)
  if state ~= 'running' then
    redis.call('ZREM', base .. ':s:' .. state, id)
  end
  if state == 'available' then
    redis.call('ZREM', base .. ':ready', id)
  elseif state == 'scheduled' or state == 'retryable' then
    redis.call('ZREM', base .. ':delayed', id)
  elseif state == 'running' then
    redis.call('ZREM', base .. ':leases', id)
    if h.lease_owner then
      redis.call('SREM', base .. ':w:' .. h.lease_owner, id)
    end
  else
    redis.call('ZREM', fin_key(state, h.idempotency_key), id)
  end
end

-- Makes up to `limit` delayed jobs due at `now` available; returns how many.
local function promote(now, limit)
  local due = redis.call('ZRANGEBYSCORE', base .. ':delayed', '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, id in ipairs(due) do
    local h = load(id)
    if h and (h.state == 'scheduled' or h.state == 'retryable') then
      unindex(id, h.state, h)
      redis.call('HSET', jkey(id), 'state', 'available')
      index(id, 'available', h)
      n = n + 1
    else
      redis.call('ZREM', base .. ':delayed', id)
    end
  end
  return n
end

-- Sends `cmd key values...` in calls of at most 1,000 values (so `unpack` stays far below
-- Lua's stack limit whatever the batch size). For ZADD the values are score/member pairs.
local function bulk(cmd, key, values)
  for i = 1, #values, 1000 do
    redis.call(cmd, key, unpack(values, i, math.min(i + 999, #values)))
  end
end
