-- Records job ARGV[2]'s progress report ARGV[4] (JSON) if it is running attempt ARGV[3];
-- returns 1 if it did, 0 if the job finished, was rescued or is gone.
local k = jkey(ARGV[2])
local v = redis.call('HMGET', k, 'state', 'attempt')
if v[1] == 'running' and v[2] == ARGV[3] then
  redis.call('HSET', k, 'progress', ARGV[4])
  return 1
end
return 0
