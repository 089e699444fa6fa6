-- Makes up to ARGV[3] delayed jobs due at ARGV[2] available; returns how many. ARGV[4] is the
-- jobs channel, ARGV[5] the queue.
local n = promote(ARGV[2], tonumber(ARGV[3]))
if n > 0 then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return n
