-- Summarises up to ARGV[6] finished jobs of one set (ARGV[2], e.g. 'fin:completed') finalized in
-- [ARGV[4], ARGV[5]) µs, skipping the first ARGV[7] of those finalized exactly at ARGV[4] (a batch
-- of finishes shares one instant, so the cursor is an instant and how many at it were read).
-- ARGV[3] is the state, unused here but named for the reader of a MONITOR trace.
-- Returns: how many were read, the cursor (instant, count at it), then pairs of
-- 'kind\trun bucket\twait bucket' and a count; buckets are floor(8 * log2(max(µs, 1))), '' when
-- the job never ran (see worker/src/stats.rs).
local zset = base .. ':' .. ARGV[2]
local limit = tonumber(ARGV[6])
local entries = redis.call('ZRANGEBYSCORE', zset, ARGV[4], '(' .. ARGV[5], 'WITHSCORES', 'LIMIT',
  tonumber(ARGV[7]), limit)
local ln2 = math.log(2)
local function bucket(us)
  if us < 1 then
    us = 1
  end
  return tostring(math.floor(8 * math.log(us) / ln2))
end
local agg = {}
local at, ties = tonumber(ARGV[4]), tonumber(ARGV[7])
local n = 0
for i = 1, #entries, 2 do
  local score = tonumber(entries[i + 1])
  if score == at then
    ties = ties + 1
  else
    at, ties = score, 1
  end
  n = n + 1
  local h = redis.call('HMGET', jkey(entries[i]), 'kind', 'run_at', 'attempted_at', 'finalized_at')
  if h[1] then
    local rb, wb = '', ''
    if h[3] and h[4] then
      rb = bucket(tonumber(h[4]) - tonumber(h[3]))
      wb = bucket(tonumber(h[3]) - tonumber(h[2]))
    end
    local k = h[1] .. '\t' .. rb .. '\t' .. wb
    agg[k] = (agg[k] or 0) + 1
  end
end
local out = { tostring(n), fmt(at), tostring(ties) }
for k, c in pairs(agg) do
  out[#out + 1] = k
  out[#out + 1] = tostring(c)
end
return out
