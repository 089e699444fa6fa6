-- Claims up to ARGV[3] jobs. ARGV: base, now, limit, worker, lease deadline, promote chunk,
-- inline limit. First promotes a bounded chunk of due delayed jobs, so a due job needs no
-- promoter. Returns one {id, fields} pair per claimed job. The fields are the job's hash when
-- at most ARGV[7] jobs were claimed, else empty: the caller then reads the hashes itself,
-- since handing a hash through Lua costs the server about three times a plain HGETALL.
local now, worker, until_ = ARGV[2], ARGV[4], ARGV[5]
promote(now, tonumber(ARGV[6]))
local popped = redis.call('ZPOPMIN', base .. ':ready', tonumber(ARGV[3]))
local b = batch()
local running = { lease_owner = worker, lease_expires_at = until_ }
local claimed = {}
for i = 1, #popped, 2 do
  local id = popped[i]
  local k = jkey(id)
  local v = redis.call('HMGET', k, 'state', 'attempt')
  if v[1] == 'available' then
    b:push('ZREM', base .. ':s:available', id)
    redis.call('HSET', k, 'state', 'running', 'attempt', tostring(tonumber(v[2]) + 1),
      'attempted_at', now, 'lease_owner', worker, 'lease_expires_at', until_)
    b:index(id, 'running', running)
    claimed[#claimed + 1] = id
  end
end
b:flush()
local inline = #claimed <= tonumber(ARGV[7])
local out = {}
for i, id in ipairs(claimed) do
  if inline then
    out[i] = { id, redis.call('HGETALL', jkey(id)) }
  else
    out[i] = { id, {} }
  end
end
return out
