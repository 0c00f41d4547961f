-- A mail record for one reply at a time. The taker holds a lease; a lease whose holder is
-- no longer alive (its owner key lapsed) is taken over at once, so a reply handled by a
-- replica that died is not held up for the whole lease. The taker's own lease is its to
-- take again (a reply it gave up on without being able to give the lease back): the
-- process itself knows which replies it is handling right now.
-- ARGV[A..]: owner, lease ms, mail id. Result: {record, unknown flag}, 'busy', or nil.
local taken_key = key('taken', ARGV[A + 2])
local holder = redis.call('GET', taken_key)
if holder and holder ~= ARGV[A] and redis.call('EXISTS', key('owner', holder)) == 1 then
  return {GEN, GEN_SEEN, 'busy'}
end
local mail = redis.call('HMGET', key('mail', ARGV[A + 2]), 'record', 'unknown')
if not mail[1] then
  return {GEN, GEN_SEEN, false}
end
redis.call('SET', taken_key, ARGV[A], 'PX', ARGV[A + 1])
return {GEN, GEN_SEEN, mail}
