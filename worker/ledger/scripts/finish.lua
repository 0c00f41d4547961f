-- The ledger side of a settled set (see worker.ledger.Finish), in one step.
-- ARGV[A..]: dedup_ttl ms; sent count, then (request id, mail id, event, fingerprint)
--   each; answered count, then (request id, event, fingerprint) each; released count, ids;
--   refunds count, content keys; mails_done count, mail ids; replied count, mail ids.
-- `sent` and `answered` are written even where the entry is gone (Redis lost its data
-- meanwhile): knowing the request went out is what keeps it from going twice.
local dedup_ms = tonumber(ARGV[A])
local at = A + 1

local function take_count()
  local n = tonumber(ARGV[at])
  at = at + 1
  return n
end

for _ = 1, take_count() do
  local entry_key = key('entry', ARGV[at])
  local state = redis.call('HGET', entry_key, 'state')
  if state ~= 'answered' then
    redis.call('HSET', entry_key, 'state', 'sent', 'mail', ARGV[at + 1], 'event', ARGV[at + 2],
      'fp', ARGV[at + 3], 'at', fmt(NOW))
    redis.call('PEXPIRE', entry_key, dedup_ms)
  end
  at = at + 4
end
for _ = 1, take_count() do
  local entry_key = key('entry', ARGV[at])
  redis.call('HSET', entry_key, 'state', 'answered', 'event', ARGV[at + 1], 'fp', ARGV[at + 2],
    'at', fmt(NOW))
  redis.call('PEXPIRE', entry_key, dedup_ms)
  at = at + 3
end
for _ = 1, take_count() do
  local entry_key = key('entry', ARGV[at])
  if redis.call('EXISTS', entry_key) == 1 then
    redis.call('HSET', entry_key, 'state', 'released', 'at', fmt(NOW))
    redis.call('HDEL', entry_key, 'mail')
    redis.call('PEXPIRE', entry_key, dedup_ms)
  end
  at = at + 1
end
for _ = 1, take_count() do
  redis.call('ZPOPMAX', key('window', ARGV[at]))
  at = at + 1
end
for _ = 1, take_count() do
  redis.call('DEL', key('mail', ARGV[at]), key('taken', ARGV[at]))
  redis.call('ZREM', key('unanswered'), ARGV[at])
  at = at + 1
end
for _ = 1, take_count() do
  redis.call('DEL', key('mail', ARGV[at]), key('taken', ARGV[at]))
  redis.call('ZREM', key('unanswered'), ARGV[at])
  redis.call('SET', key('replied', ARGV[at]), '1', 'PX', dedup_ms)
  at = at + 1
end
return {GEN, GEN_SEEN, false}
