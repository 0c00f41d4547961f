-- Open the circuit, as worker.limits.CircuitRule.open: the pause doubles from base up to
-- cap while the circuit stays open or half open; an explicit pause is used once as given.
-- ARGV[A..]: base s, cap s, pause s ('' to double), reason, keep s (TTL past the pause).
-- Result: the pause chosen (seconds, as text).
local base, cap = tonumber(ARGV[A]), tonumber(ARGV[A + 1])
local circuit_key = key('circuit')
local c = redis.call('HMGET', circuit_key, 'open_until', 'pause')
local pause = base
if c[1] then
  pause = math.min(tonumber(c[2]) * 2, cap)
end
local chosen = pause
if ARGV[A + 2] ~= '' then
  chosen = tonumber(ARGV[A + 2])
end
redis.call('HSET', circuit_key, 'open_until', fmt(NOW + chosen), 'pause', fmt(pause),
  'probe_until', '0', 'reason', ARGV[A + 3])
redis.call('PEXPIRE', circuit_key, ms(math.max(chosen, pause) + tonumber(ARGV[A + 4])))
return {GEN, GEN_SEEN, fmt(chosen)}
