-- start / heartbeat: this owner is alive for owner_ttl.
-- ARGV[A]: owner, ARGV[A+1]: owner_ttl in ms.
redis.call('SET', key('owner', ARGV[A]), fmt(NOW), 'PX', ARGV[A + 1])
return {GEN, GEN_SEEN, false}
