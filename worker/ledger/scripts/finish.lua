-- The ledger side of a settled set (see worker.ledger.Finish), in one step.
-- ARGV[A]: dedup_ttl ms; ARGV[A + 1]: the set as one JSON object (one argument: the
--   client packs each argument in Python): sent [[request id, mail id, event,
--   fingerprint], ...], answered [[request id, event, fingerprint], ...], released
--   [ids], refunds [[content key, [subscribers]], ...], mails_done [mail ids], replied
--   [mail ids].
-- `sent` and `answered` are written even where the entry is gone (Redis lost its data
-- meanwhile): knowing the request went out is what keeps it from going twice.
local dedup_ms = tonumber(ARGV[A])
local set = cjson.decode(ARGV[A + 1])

for _, sent in ipairs(set.sent) do
  local entry_key = key('entry', sent[1])
  local state = redis.call('HGET', entry_key, 'state')
  if state ~= 'answered' then
    redis.call('HSET', entry_key, 'state', 'sent', 'mail', sent[2], 'event', sent[3],
      'fp', sent[4], 'at', fmt(NOW))
    redis.call('PEXPIRE', entry_key, dedup_ms)
  end
end
for _, answered in ipairs(set.answered) do
  local entry_key = key('entry', answered[1])
  redis.call('HSET', entry_key, 'state', 'answered', 'event', answered[2], 'fp', answered[3],
    'at', fmt(NOW))
  redis.call('PEXPIRE', entry_key, dedup_ms)
end
for _, request_id in ipairs(set.released) do
  local entry_key = key('entry', request_id)
  if redis.call('EXISTS', entry_key) == 1 then
    redis.call('HSET', entry_key, 'state', 'released', 'at', fmt(NOW))
    redis.call('HDEL', entry_key, 'mail')
    redis.call('PEXPIRE', entry_key, dedup_ms)
  end
end
-- A refund gives back an admission: its identical copy and one message of each of its
-- subscribers' streaks (the streak's time stays: the gap can only end later).
for _, refund in ipairs(set.refunds) do
  redis.call('ZPOPMAX', key('window', refund[1]))
  for _, subscriber in ipairs(refund[2]) do
    local streak_key = key('streak', subscriber)
    local n = tonumber(redis.call('HGET', streak_key, 'n') or '0')
    if n > 0 then
      redis.call('HSET', streak_key, 'n', n - 1)
    end
  end
end
for _, mail_id in ipairs(set.mails_done) do
  redis.call('DEL', key('mail', mail_id), key('taken', mail_id))
  redis.call('ZREM', key('unanswered'), mail_id)
end
for _, mail_id in ipairs(set.replied) do
  redis.call('DEL', key('mail', mail_id), key('taken', mail_id))
  redis.call('ZREM', key('unanswered'), mail_id)
  redis.call('SET', key('replied', mail_id), '1', 'PX', dedup_ms)
end
return {GEN, GEN_SEEN, false}
