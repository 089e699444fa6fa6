-- Deletes each listed job: any that is not running (ARGV[2] = 'any') or finished ones only
-- (ARGV[2] = 'finished'). Two strings per id: 'ok', 'missing' or the refusing state, then
-- the job's idempotency key ('' for none) so the caller can free it.
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local h = load(id)
  if not h then
    out[#out + 1] = 'missing'
    out[#out + 1] = ''
  elseif h.state == 'running' or (ARGV[2] == 'finished' and is_waiting(h.state)) then
    out[#out + 1] = h.state
    out[#out + 1] = ''
  else
    unindex(id, h.state, h)
    redis.call('DEL', jkey(id), hist_key(id))
    out[#out + 1] = 'ok'
    out[#out + 1] = h.idempotency_key or ''
  end
end
return out
