-- An e-mail of a split (the search for the line that made the gateway refuse an e-mail)
-- was answered. ARGV[A..]: root mail id, 'failed' or 'ok', allowance, ttl in ms.
-- A failure takes two e-mails (its halves) while the split is within its allowance, or
-- without limit once one of its e-mails got through. Returns {failures, successes, granted}.
local split_key = key('split', ARGV[A])
local granted = 0
if ARGV[A + 1] == 'failed' then
  redis.call('HINCRBY', split_key, 'failed', 1)
  local ok = tonumber(redis.call('HGET', split_key, 'ok') or '0')
  local mails = tonumber(redis.call('HGET', split_key, 'mails') or '0')
  if ok > 0 or mails + 2 <= tonumber(ARGV[A + 2]) then
    redis.call('HINCRBY', split_key, 'mails', 2)
    granted = 1
  end
else
  redis.call('HINCRBY', split_key, 'ok', 1)
end
redis.call('PEXPIRE', split_key, ARGV[A + 3])
local counts = redis.call('HMGET', split_key, 'failed', 'ok')
return {GEN, GEN_SEEN, {tonumber(counts[1] or '0'), tonumber(counts[2] or '0'), granted}}
