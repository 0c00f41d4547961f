-- Let a record be taken again, unless the lease has passed to another replica meanwhile.
-- ARGV[A..]: owner, mail id.
local taken_key = key('taken', ARGV[A + 1])
if redis.call('GET', taken_key) == ARGV[A] then
  redis.call('DEL', taken_key)
end
return {GEN, GEN_SEEN, false}
