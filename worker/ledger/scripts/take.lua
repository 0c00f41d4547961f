-- A mail record for one reply at a time: a lease that lapses if the replica handling the
-- reply dies. ARGV[A..]: owner, lease ms, mail id. Result: {record, unknown flag} or nil.
local taken_key = key('taken', ARGV[A + 2])
if redis.call('EXISTS', taken_key) == 1 then
  return {GEN, GEN_SEEN, false}
end
local mail = redis.call('HMGET', key('mail', ARGV[A + 2]), 'record', 'unknown')
if not mail[1] then
  return {GEN, GEN_SEEN, false}
end
redis.call('SET', taken_key, ARGV[A], 'PX', ARGV[A + 1])
return {GEN, GEN_SEEN, mail}
