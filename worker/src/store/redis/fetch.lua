-- Claims up to ARGV[3] jobs. ARGV: base, now, limit, worker, lease deadline, promote chunk.
-- First promotes a bounded chunk of due delayed jobs, so a due job needs no promoter.
local now, worker, until_ = ARGV[2], ARGV[4], ARGV[5]
promote(now, tonumber(ARGV[6]))
local popped = redis.call('ZPOPMIN', base .. ':ready', tonumber(ARGV[3]))
local out = {}
for i = 1, #popped, 2 do
  local id = popped[i]
  local k = jkey(id)
  local state = redis.call('HGET', k, 'state')
  if state == 'available' then
    redis.call('ZREM', base .. ':s:available', id)
    redis.call('HSET', k, 'state', 'running', 'attempted_at', now, 'lease_owner', worker,
      'lease_expires_at', until_)
    redis.call('HINCRBY', k, 'attempt', 1)
    index(id, 'running', { lease_owner = worker, lease_expires_at = until_ })
    out[#out + 1] = redis.call('HGETALL', k)
  end
end
return out
