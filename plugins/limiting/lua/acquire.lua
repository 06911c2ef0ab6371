-- KEYS: client slots, client rpm, client tpm, lane slots, lane rpm, lane tpm, lane hold,
-- lane control. ARGV: permit id, lease ms, client max, client rpm interval ms and capacity,
-- client tpm interval ms and capacity, lane max (0: no lane slots), lane rpm interval and
-- capacity, lane tpm interval and capacity, tokens, adaptive (1/0), initial limit.
-- Returns {1, admitted at, lane limit} or {0, wait ms (-1: a slot), reason}.
local lease = tonumber(ARGV[2])
local cost = tonumber(ARGV[13])
local adaptive = ARGV[14] == '1'
if adaptive then
  local hold = redis.call('PTTL', KEYS[7])
  if hold > 0 then return {0, hold, 'hold'} end
end
local function full(key, limit)
  if limit <= 0 then return false end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key) >= limit
end
-- Milliseconds until `amount` fits; more than a whole bucket goes when the bucket is full
-- and leaves a debt, as the in-process token bucket does.
local function wait_for(key, interval, capacity, amount)
  if interval <= 0 or amount <= 0 then return 0 end
  return tat_of(key) - now - (capacity - math.min(amount, capacity)) * interval
end
local function charge(key, interval, amount)
  if interval <= 0 or amount <= 0 then return end
  set_tat(key, tat_of(key) + amount * interval)
end
local lane_limit = tonumber(ARGV[8])
if adaptive and lane_limit > 0 then
  local learned = tonumber(redis.call('HGET', KEYS[8], 'limit')) or tonumber(ARGV[15])
  lane_limit = math.min(lane_limit, math.max(1, math.floor(learned)))
end
if full(KEYS[1], tonumber(ARGV[3])) or full(KEYS[4], lane_limit) then
  return {0, -1, 'slots'}
end
local wait = math.max(
  wait_for(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), 1),
  wait_for(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]), cost),
  wait_for(KEYS[5], tonumber(ARGV[9]), tonumber(ARGV[10]), 1),
  wait_for(KEYS[6], tonumber(ARGV[11]), tonumber(ARGV[12]), cost))
if wait > 0 then return {0, math.ceil(wait), 'rate'} end
charge(KEYS[2], tonumber(ARGV[4]), 1)
charge(KEYS[3], tonumber(ARGV[6]), cost)
charge(KEYS[5], tonumber(ARGV[9]), 1)
charge(KEYS[6], tonumber(ARGV[11]), cost)
local expiry = fmt(now + lease)
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * lease)
if lane_limit > 0 then
  redis.call('ZADD', KEYS[4], expiry, ARGV[1])
  redis.call('PEXPIRE', KEYS[4], 2 * lease)
end
return {1, fmt(now), lane_limit}
