-- Priority lanes across the fleet: may this waiter try for admission now?
-- KEYS: the model lane's waiters (sorted set: waiter id scored rank * span + the call's start
-- in ms), their heartbeats (sorted set: waiter id scored by when it is forgotten), the lower
-- lanes' starvation credit, then the client's waiters and heartbeats (those held up by what
-- every model shares). ARGV: waiter id, priority rank, the call's age in ms, heartbeat ttl ms,
-- starvation ms, span, shared (1: this waiter is held up by a client-wide limit).
-- Returns {1} (no higher lane waits for this model or for the client-wide limits: try), {2}
-- (one does, but this is the starving oldest waiter of the lower lanes and they have a whole
-- credit: try, and spend it when admitted) or {0} (a higher lane waits: do not try).
local id, rank, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local starvation, span = tonumber(ARGV[5]), tonumber(ARGV[6])
-- Waiters whose process stopped calling (killed, gone) are forgotten: none blocks the fleet.
for _, pair in ipairs({{KEYS[1], KEYS[2]}, {KEYS[4], KEYS[5]}}) do
  local dead = redis.call('ZRANGEBYSCORE', pair[2], '-inf', now)
  if #dead > 0 then
    redis.call('ZREM', pair[1], unpack(dead))
    redis.call('ZREM', pair[2], unpack(dead))
  end
end
local function enter(waiting, seen, score)
  redis.call('ZADD', waiting, score, id)
  redis.call('ZADD', seen, fmt(now + ttl), id)
  redis.call('PEXPIRE', waiting, ttl)
  redis.call('PEXPIRE', seen, ttl)
end
local score = tonumber(redis.call('ZSCORE', KEYS[1], id))
if not score then score = rank * span + math.floor(now - tonumber(ARGV[3])) end
enter(KEYS[1], KEYS[2], score)
if ARGV[7] == '1' then enter(KEYS[4], KEYS[5], score) end
local top = rank
for _, waiting in ipairs({KEYS[1], KEYS[4]}) do
  local first = redis.call('ZRANGE', waiting, 0, 0, 'WITHSCORES')
  if #first > 0 then top = math.min(top, math.floor(tonumber(first[2]) / span)) end
end
if top >= rank then return {1} end
local credit = tonumber(redis.call('GET', KEYS[3])) or 0
local since = score % span
if credit < 1 - 1e-9 or now - since < starvation then return {0} end
local lower = redis.call('ZRANGEBYSCORE', KEYS[1], (top + 1) * span, '+inf', 'WITHSCORES')
for i = 1, #lower, 2 do
  if tonumber(lower[i + 1]) % span < since then return {0} end
end
return {2}
