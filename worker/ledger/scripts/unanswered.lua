-- E-mails submitted before ARGV[A] (wall time) with no reply yet and not being handled by
-- a reply now; members whose record has expired are dropped on the way.
local unanswered = key('unanswered')
local ids = redis.call('ZRANGEBYSCORE', unanswered, '-inf', '(' .. ARGV[A])
local out = {}
for _, mail_id in ipairs(ids) do
  if redis.call('EXISTS', key('mail', mail_id)) == 0 then
    redis.call('ZREM', unanswered, mail_id)
  elseif redis.call('EXISTS', key('taken', mail_id)) == 0 then
    out[#out + 1] = mail_id
  end
end
return {GEN, GEN_SEEN, out}
