-- KEYS: client slots, client rpm, client tpm, lane slots, lane rpm, lane tpm, lane hold,
-- lane control, lane pace, lane learned tpm, lane learned, lane window. ARGV: permit id, lease ms,
-- client max, client rpm interval ms and capacity, client tpm interval ms and capacity, lane
-- max (0: no lane slots), lane rpm interval and capacity, lane tpm interval and capacity,
-- tokens, adaptive (1/0), initial limit, learned send interval ms (0: none), learned token
-- interval ms and capacity, the learned version the caller knows, control ttl ms, the
-- window the caller knows (length ms, 0: none; quota; aligned to the clock 1/0; slack ms) and
-- its ceiling on calls in flight (0: none), then field/value pairs the caller learned
-- (published to the fleet before anything else).
-- Returns {1, admitted at, lane limit, the fleet's calls in flight with this one, its rank
-- among the window's admissions (0: no window), ...} or {0, wait ms (-1: a slot), reason, 0,
-- 0, ...},
-- followed by the lane's counters (sent, oks, sent tokens, ok tokens), the learned version
-- and, when the caller does not know that version yet, every learned field/value pair.
local lease = tonumber(ARGV[2])
local cost = tonumber(ARGV[13])
local adaptive = ARGV[14] == '1'
local ttl = tonumber(ARGV[20])
-- What the fleet learned: the caller's news first, then what it has not seen yet.
local known = tonumber(ARGV[19])
local version = tonumber(redis.call('HGET', KEYS[11], 'version')) or 0
if #ARGV > 25 then
  local fields = {}
  for i = 26, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[11], unpack(fields))
  if version == known then known = version + 1 end
  version = redis.call('HINCRBY', KEYS[11], 'version', 1)
end
if version > 0 then redis.call('PEXPIRE', KEYS[11], ttl) end
local function answer(head)
  for _, value in ipairs(counters(KEYS[8])) do head[#head + 1] = value end
  head[#head + 1] = tostring(version)
  if version ~= known then
    local all = redis.call('HGETALL', KEYS[11])
    for i = 1, #all, 2 do
      if all[i] ~= 'version' then
        head[#head + 1] = all[i]
        head[#head + 1] = all[i + 1]
      end
    end
  end
  return head
end
if adaptive then
  local hold = redis.call('PTTL', KEYS[7])
  if hold > 0 then return answer({0, hold, 'hold', 0, 0}) end
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
  -- A cap on calls in flight counts the whole fleet's: so does the ceiling learned from it,
  -- by the caller or by any process (before the caller has taken it in).
  local ceiling = tonumber(ARGV[25])
  if ceiling > 0 then lane_limit = math.min(lane_limit, ceiling) end
  local shared = tonumber(redis.call('HGET', KEYS[11], 'ceiling'))
  if shared and shared > 0 then lane_limit = math.min(lane_limit, shared) end
end
if full(KEYS[1], tonumber(ARGV[3])) or full(KEYS[4], lane_limit) then
  return answer({0, -1, 'slots', 0, 0})
end
-- A known window: its quota goes out once per window for the whole fleet, the window opening
-- with its first admission (as the servers that count from a first request do) or at the
-- clock's boundary.
local window, quota, aligned = tonumber(ARGV[21]), tonumber(ARGV[22]), ARGV[23] == '1'
if adaptive then
  local w = redis.call('HMGET', KEYS[11], 'window_s', 'window_quota', 'window_aligned')
  local fleet_window, fleet_quota = tonumber(w[1]), tonumber(w[2])
  if fleet_window and fleet_quota then
    fleet_window = fleet_window * 1000
    if window <= 0 then  -- one the fleet learned, before the caller took it in
      window, quota, aligned = fleet_window, fleet_quota, w[3] == 'true'
    elseif math.abs(fleet_window - window) < 1 and fleet_quota > quota then
      quota = fleet_quota  -- raised by a probe elsewhere, before the caller took it in
    end
  end
end
if window > 0 and quota > 0 then
  local used = tonumber(redis.call('GET', KEYS[12])) or 0
  local left = redis.call('PTTL', KEYS[12])
  if used >= quota and left > 0 then return answer({0, left, 'window', 0, 0}) end
end
local wait = math.max(
  wait_for(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), 1),
  wait_for(KEYS[3], tonumber(ARGV[6]), tonumber(ARGV[7]), cost),
  wait_for(KEYS[5], tonumber(ARGV[9]), tonumber(ARGV[10]), 1),
  wait_for(KEYS[6], tonumber(ARGV[11]), tonumber(ARGV[12]), cost))
if wait > 0 then return answer({0, math.ceil(wait), 'rate', 0, 0}) end
-- The fleet's learned rates: one send interval and one token bucket for every process.
local paced = math.max(
  wait_for(KEYS[9], tonumber(ARGV[16]), 1, 1),
  wait_for(KEYS[10], tonumber(ARGV[17]), tonumber(ARGV[18]), cost))
if paced > 0 then return answer({0, math.ceil(paced), 'pace', 0, 0}) end
charge(KEYS[2], tonumber(ARGV[4]), 1)
charge(KEYS[3], tonumber(ARGV[6]), cost)
charge(KEYS[5], tonumber(ARGV[9]), 1)
charge(KEYS[6], tonumber(ARGV[11]), cost)
charge(KEYS[9], tonumber(ARGV[16]), 1)
charge(KEYS[10], tonumber(ARGV[17]), cost)
local rank = 0
if window > 0 and quota > 0 then
  rank = redis.call('INCR', KEYS[12])
  if rank == 1 then
    local span = window
    if aligned then span = window - now % window end
    redis.call('PEXPIRE', KEYS[12], math.ceil(span + tonumber(ARGV[24])))
  end
end
local expiry = fmt(now + lease)
redis.call('ZADD', KEYS[1], expiry, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * lease)
if lane_limit > 0 then
  redis.call('ZADD', KEYS[4], expiry, ARGV[1])
  redis.call('PEXPIRE', KEYS[4], 2 * lease)
end
if adaptive then
  redis.call('HINCRBY', KEYS[8], 'sent', 1)
  if cost > 0 then redis.call('HINCRBY', KEYS[8], 'sent_tokens', cost) end
  redis.call('PEXPIRE', KEYS[8], ttl)
end
local level
if lane_limit > 0 then level = redis.call('ZCARD', KEYS[4]) else level = redis.call('ZCARD', KEYS[1]) end
return answer({1, fmt(now), lane_limit, level, rank})
