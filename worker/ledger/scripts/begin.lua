-- Before DATA (see StateStore.begin_sending): the account, the circuit, the claims, the
-- pace; then the record and the `sending` marks, or nothing at all.
-- ARGV[A..]: owner, mail id, record (JSON), submitted_at, record ttl ms, dedup_ttl ms,
--   mails_per_second, parts_per_second, sms parts, how deep into the pace's burst the
--   e-mail may go, the share of the rate a high-priority e-mail may use ('' for the
--   others), the request ids as one JSON array.
-- Result: {kind, wait, reason, lost ids, probe ('1'/'0')}.
local owner, mail_id, record, submitted_at = ARGV[A], ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local record_ms, dedup_ms = tonumber(ARGV[A + 4]), tonumber(ARGV[A + 5])
local mails_rate, parts_rate = tonumber(ARGV[A + 6]), tonumber(ARGV[A + 7])
local parts = tonumber(ARGV[A + 8])
local depth, high_share = tonumber(ARGV[A + 9]), ARGV[A + 10]
local request_ids = cjson.decode(ARGV[A + 11])

local function result(kind, wait, reason, lost, probe)
  return {GEN, GEN_SEEN, {kind, fmt(wait), reason, lost, probe}}
end

local stopped = redis.call('GET', key('stopped'))
if stopped then
  return result('stopped', 0, stopped, {}, '0')
end

local circuit_key = key('circuit')
local circuit = redis.call('HMGET', circuit_key, 'open_until', 'probe_until', 'pause')
local probe = false
if circuit[1] then
  local open_until = tonumber(circuit[1])
  local probe_until = tonumber(circuit[2] or '0')
  if NOW < open_until then
    return result('wait', open_until - NOW, 'circuit_open', {}, '0')
  end
  if NOW < probe_until then
    return result('wait', probe_until - NOW, 'circuit_open', {}, '0')
  end
  probe = true
end

local lost = {}
for _, request_id in ipairs(request_ids) do
  local e = redis.call('HMGET', key('entry', request_id), 'state', 'owner')
  if e[1] ~= 'claimed' or e[2] ~= owner then
    lost[#lost + 1] = request_id
  end
end
if #lost > 0 then
  return result('lost', 0, '', lost, '0')
end

-- GCRA, as worker.limits.Pace: `rate` units per second, a burst of one second's worth,
-- of which `depth` may be filled.
local function pace(cell, rate, cost, depth)
  cost = math.min(cost, rate)
  local tat = math.max(tonumber(redis.call('GET', cell) or '0'), NOW)
  local allow_at = tat + math.min(cost, rate * depth) / rate - depth
  if allow_at > NOW then
    return allow_at - NOW, tat
  end
  return 0, tat + cost / rate
end
-- The account's pace, and for a high-priority e-mail the share of it its lane may use.
local cells = {
  {key('pace', 'mails'), mails_rate, 1, depth},
  {key('pace', 'parts'), parts_rate, parts, depth},
}
if high_share ~= '' then
  cells[3] = {key('pace', 'mails:high'), mails_rate * tonumber(high_share), 1, 1}
  cells[4] = {key('pace', 'parts:high'), parts_rate * tonumber(high_share), parts, 1}
end
local wait, tats = 0, {}
for i, cell in ipairs(cells) do
  local w, tat = pace(cell[1], cell[2], cell[3], cell[4])
  wait, tats[i] = math.max(wait, w), tat
end
if wait > 0 then
  return result('wait', wait, 'pace', {}, '0')
end
for i, cell in ipairs(cells) do
  redis.call('SET', cell[1], fmt(tats[i]), 'PX', ms(tats[i] - NOW + 1))
end

if probe then
  local pause = tonumber(circuit[3])
  redis.call('HSET', circuit_key, 'probe_until', fmt(NOW + pause))
end

local mail_key = key('mail', mail_id)
redis.call('DEL', mail_key)
redis.call('HSET', mail_key, 'record', record, 'unknown', '0')
redis.call('PEXPIRE', mail_key, record_ms)
local unanswered = key('unanswered')
redis.call('ZADD', unanswered, submitted_at, mail_id)
redis.call('PEXPIRE', unanswered, record_ms)
for _, request_id in ipairs(request_ids) do
  local entry_key = key('entry', request_id)
  redis.call('HSET', entry_key, 'state', 'sending', 'mail', mail_id, 'at', fmt(NOW))
  redis.call('PEXPIRE', entry_key, dedup_ms)
end
return result('go', 0, '', {}, probe and '1' or '0')
