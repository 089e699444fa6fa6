-- Deletes each listed job that operator action ARGV[2] ('discard' or 'purge') may start from
-- (FROM.discard, FROM.purge). Two strings per id: 'ok', 'missing' or the refusing state, then
-- the job's idempotency key ('' for none) so the caller can free it.
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local h = load(id)
  if not h then
    out[#out + 1] = 'missing'
    out[#out + 1] = ''
  elseif not FROM[ARGV[2]][h.state] then
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
