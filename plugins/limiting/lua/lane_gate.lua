-- Priority lanes across the fleet: may this waiter try for admission now?
-- KEYS: the lane's waiters (sorted set: waiter id scored rank * span + the call's start in
-- ms), their heartbeats (sorted set: waiter id scored by when it is forgotten), the lower
-- lanes' starvation credit. ARGV: waiter id, priority rank, the call's age in ms, heartbeat
-- ttl ms, starvation ms, span.
-- Returns {1} (no higher lane waits anywhere: try), {2} (a higher lane waits, but this is the
-- starving oldest waiter of the lower lanes and they have a whole credit: try, and spend it
-- when admitted) or {0} (a higher lane waits: do not try).
local id, rank, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local starvation, span = tonumber(ARGV[5]), tonumber(ARGV[6])
-- Waiters whose process stopped calling (killed, gone) are forgotten: none blocks the fleet.
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #dead > 0 then
  redis.call('ZREM', KEYS[1], unpack(dead))
  redis.call('ZREM', KEYS[2], unpack(dead))
end
local score = tonumber(redis.call('ZSCORE', KEYS[1], id))
if not score then
  score = rank * span + math.floor(now - tonumber(ARGV[3]))
  redis.call('ZADD', KEYS[1], score, id)
end
redis.call('ZADD', KEYS[2], fmt(now + ttl), id)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local top = math.floor(tonumber(first[2]) / span)
if top >= rank then return {1} end
local credit = tonumber(redis.call('GET', KEYS[3])) or 0
local since = score % span
if credit < 1 - 1e-9 or now - since < starvation then return {0} end
local lower = redis.call('ZRANGEBYSCORE', KEYS[1], (top + 1) * span, '+inf', 'WITHSCORES')
for i = 1, #lower, 2 do
  if tonumber(lower[i + 1]) % span < since then return {0} end
end
return {2}
