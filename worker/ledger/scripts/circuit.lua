-- The circuit as seen now: 'closed', 'open' or 'half_open'.
local open_until = redis.call('HGET', key('circuit'), 'open_until')
local view = 'closed'
if open_until then
  if NOW < tonumber(open_until) then
    view = 'open'
  else
    view = 'half_open'
  end
end
return {GEN, GEN_SEEN, view}
