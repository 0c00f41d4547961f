-- Judge a burst of arriving requests (see StateStore.intake).
-- ARGV[A..A+7]: owner, dedup_ttl ms, identical_per_window, identical_window s,
--   subscriber_streak, subscriber_gap s, busy wait s, and the items as one JSON array,
--   each [request id, fingerprint, content key, redelivered (boolean), [subscribers]]
--   (one argument for the burst: the client packs each argument in Python).
-- Result: per item five values: kind, wait (seconds, as text), reason, mail id, event.
local owner = ARGV[A]
local dedup_ms = tonumber(ARGV[A + 1])
local allowed = tonumber(ARGV[A + 2])
local window = tonumber(ARGV[A + 3])
local streak_limit = tonumber(ARGV[A + 4])
local gap = tonumber(ARGV[A + 5])
local busy_wait = ARGV[A + 6]
local items = cjson.decode(ARGV[A + 7])
local ledger_lost_window = redis.call('EXISTS', KEYS[2]) == 1

local function held_by_other(entry_owner)
  return entry_owner and entry_owner ~= owner
    and redis.call('EXISTS', key('owner', entry_owner)) == 1
end

local out = {}
for item, fields in ipairs(items) do
  local rid, fp, content = fields[1], fields[2], fields[3]
  local redelivered = fields[4]
  local subscribers = fields[5]

  local entry_key = key('entry', rid)
  local e = redis.call('HMGET', entry_key, 'state', 'fp', 'owner', 'mail', 'event')
  local state, entry_fp, entry_owner, mail, event = e[1], e[2], e[3], e[4], e[5]
  local verdict = nil
  if state and state ~= 'released' then
    if entry_fp ~= fp then
      verdict = {'duplicate', '0', '', false, false}
    elseif state == 'sent' or state == 'answered' then
      verdict = {'replay', '0', '', mail, event}
    elseif state == 'sending' then
      if held_by_other(entry_owner) then
        verdict = {'busy', busy_wait, 'busy', false, false}
      else
        verdict = {'unknown', '0', '', mail, false}
      end
    elseif state == 'claimed' and held_by_other(entry_owner) then
      verdict = {'busy', busy_wait, 'busy', false, false}
    end
  elseif not state and redelivered and ledger_lost_window then
    verdict = {'ledger_lost', '0', '', false, false}
  end

  if verdict == nil then
    local window_key = key('window', content)
    redis.call('ZREMRANGEBYSCORE', window_key, '-inf', fmt(NOW - window))
    if redis.call('ZCARD', window_key) >= allowed then
      local oldest = redis.call('ZRANGE', window_key, 0, 0, 'WITHSCORES')
      verdict = {'wait', fmt(tonumber(oldest[2]) + window - NOW), 'identical_content', false,
        false}
    else
      local streak_wait = 0
      for _, subscriber in ipairs(subscribers) do
        local last = redis.call('HMGET', key('streak', subscriber), 'last', 'n')
        if last[1] then
          local last_at, streak = tonumber(last[1]), tonumber(last[2])
          if NOW - last_at < gap and streak >= streak_limit then
            streak_wait = math.max(streak_wait, last_at + gap - NOW)
          end
        end
      end
      if streak_wait > 0 then
        verdict = {'wait', fmt(streak_wait), 'subscriber_flood', false, false}
      else
        redis.call('ZADD', window_key, fmt(NOW), fmt(NOW) .. ':' .. CALL_ID .. ':' .. item)
        redis.call('PEXPIRE', window_key, ms(window))
        for _, subscriber in ipairs(subscribers) do
          local streak_key = key('streak', subscriber)
          local last = redis.call('HMGET', streak_key, 'last', 'n')
          local streak = 1
          if last[1] and NOW - tonumber(last[1]) < gap then
            streak = tonumber(last[2]) + 1
          end
          redis.call('HSET', streak_key, 'last', fmt(NOW), 'n', streak)
          redis.call('PEXPIRE', streak_key, ms(gap))
        end
        redis.call('DEL', entry_key)
        redis.call('HSET', entry_key, 'state', 'claimed', 'fp', fp, 'owner', owner, 'at', fmt(NOW))
        redis.call('PEXPIRE', entry_key, dedup_ms)
        verdict = {'new', '0', '', false, false}
      end
    end
  end
  for f = 1, 5 do
    out[#out + 1] = verdict[f]
  end
end
return {GEN, GEN_SEEN, out}
