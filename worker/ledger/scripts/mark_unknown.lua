-- Flag a record's outcome unknown. ARGV[A]: mail id. Result: {record, unknown flag} or nil.
local mail_key = key('mail', ARGV[A])
if redis.call('EXISTS', mail_key) == 0 then
  return {GEN, GEN_SEEN, false}
end
redis.call('HSET', mail_key, 'unknown', '1')
return {GEN, GEN_SEEN, redis.call('HMGET', mail_key, 'record', 'unknown')}
