-- Claims up to ARGV[3] jobs. ARGV: base, lease (µs), limit, worker, promote chunk, inline
-- limit. The claim's time and the lease deadline are on the store's clock. First promotes a
-- bounded chunk of due delayed jobs, so a due job needs no promoter. Returns one {id, fields, history} per claimed job. The fields are the job's hash
-- and history when at most ARGV[6] jobs were claimed, else empty: the caller then reads them,
-- since handing a hash through Lua costs the server about three times a plain HGETALL.
-- A write Redis refuses when it is out of memory, made first (it changes nothing: `XX`
-- with a member that never exists), so that then the whole claim is refused. Otherwise the
-- pop below, a write Redis allows even then, would let the claim through, and the jobs
-- would run with no outcome that can be written (Redis refuses the finish script's first
-- write too).
redis.call('ZADD', base .. ':leases', 'XX', 0, '')
local t = store_now()
local now, worker, until_ = fmt(t), ARGV[4], fmt(t + tonumber(ARGV[2]))
promote(now, tonumber(ARGV[5]))
local popped = redis.call('ZPOPMIN', base .. ':ready', tonumber(ARGV[3]))
local prefix = base .. ':job:'
-- The index changes are collected and sent as one command per set.
local claimed, leases = {}, {}
for i = 1, #popped, 2 do
  local id = popped[i]
  local k = prefix .. id
  local v = redis.call('HMGET', k, 'state', 'attempt')
  if v[1] == 'available' then
    redis.call('HSET', k, 'state', 'running', 'attempt', tostring(tonumber(v[2]) + 1),
      'attempted_at', now, 'lease_owner', worker, 'lease_expires_at', until_)
    local n = #claimed + 1
    claimed[n] = id
    leases[2 * n - 1], leases[2 * n] = until_, id
  end
end
if #claimed > 0 then
  bulk('ZREM', base .. ':s:available', claimed)
  bulk('ZADD', base .. ':leases', leases)
  bulk('SADD', base .. ':w:' .. worker, claimed)
end
local out = {}
for i, id in ipairs(claimed) do
  if #claimed <= tonumber(ARGV[6]) then
    out[i] = { id, redis.call('HGETALL', prefix .. id), redis.call('GET', hist_key(id)) }
  else
    out[i] = { id, {}, false }
  end
end
return out
