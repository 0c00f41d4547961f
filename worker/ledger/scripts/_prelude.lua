-- Prepended to every script of the Redis state store.
--
-- KEYS[1]  the account's generation key (no TTL): a random value that disappears only when
--          Redis loses its data (a restart without persistence, a flush).
-- KEYS[2]  the reset mark: set, for reset_grace, when a generation the caller had seen was
--          found missing and replaced.
-- ARGV[1]  the account's key base, '<prefix>:{<account>}:' (every key shares its hash tag,
--          so one slot holds them all and every key built here is local on a cluster).
-- ARGV[2]  the generation this store last saw ('' before its first call).
-- ARGV[3]  a fresh random value: the new generation if it is missing, and unique per call.
-- ARGV[4]  reset_grace in milliseconds.
-- ARGV[5]  the time in seconds ('' for the server's clock, which every replica shares).
-- The script's own arguments start at ARGV[6]. Every script returns
-- {generation, 'same' | 'new' | 'changed', result}.
local BASE = ARGV[1]
local CALL_ID = ARGV[3]
local A = 6

local NOW
if ARGV[5] ~= '' then
  NOW = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(seconds)
  return string.format('%.6f', seconds)
end

local function ms(seconds)
  return math.max(1, math.ceil(seconds * 1000))
end

local function key(kind, id)
  if id == nil then
    return BASE .. kind
  end
  return BASE .. kind .. ':' .. id
end

local GEN = redis.call('GET', KEYS[1])
local GEN_SEEN = 'same'
if not GEN then
  GEN = ARGV[3]
  redis.call('SET', KEYS[1], GEN)
  -- Only a caller that saw a generation before knows that data was lost; a first start
  -- against an empty Redis is taken for a new account (README: persistence).
  local grace = tonumber(ARGV[4])
  if grace > 0 and ARGV[2] ~= '' then
    redis.call('SET', KEYS[2], fmt(NOW), 'PX', grace)
  end
  GEN_SEEN = 'new'
elseif GEN ~= ARGV[2] then
  GEN_SEEN = 'changed'
end

