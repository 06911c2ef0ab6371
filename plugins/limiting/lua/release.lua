-- KEYS: client slots, lane slots, client tpm, lane tpm, lane hold, lane control, lane
-- learned tpm. ARGV: permit id, token refund (negative: charge more), client, lane and
-- learned tpm interval ms, outcome ('429', 'ok' or ''), hold ms, admitted at, lane max,
-- initial limit, backoff factor, control ttl ms, tokens the server charged (ok only).
-- Returns {lease was held (1/0), shared limit (-1: unchanged), cut (1/0), ms since any
-- process last saw an acceptance of this model (-1: never)}, then the lane's counters.
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local refund = tonumber(ARGV[2])
if refund ~= 0 then
  for i, key in ipairs({KEYS[3], KEYS[4], KEYS[7]}) do
    local interval = tonumber(ARGV[2 + i])
    if interval > 0 then set_tat(key, tat_of(key) - refund * interval) end
  end
end
local outcome = ARGV[6]
local limit, cut = -1, 0
if outcome == '429' then
  local hold = tonumber(ARGV[7])
  if hold > 0 and redis.call('PTTL', KEYS[5]) < hold then
    redis.call('SET', KEYS[5], '1', 'PX', hold)
  end
  local state = redis.call('HMGET', KEYS[6], 'limit', 'cut_at')
  limit = tonumber(state[1]) or tonumber(ARGV[10])
  -- An attempt admitted before the last cut is an echo of the burst already acted on.
  if tonumber(ARGV[8]) >= (tonumber(state[2]) or 0) then
    limit = math.max(1, limit * tonumber(ARGV[11]))
    redis.call('HSET', KEYS[6], 'limit', string.format('%.6f', limit), 'cut_at', fmt(now),
               'ok', 0, 'slow', 0)
    cut = 1
  end
elseif outcome == 'ok' then
  local state = redis.call('HMGET', KEYS[6], 'limit', 'ok', 'slow')
  limit = tonumber(state[1]) or tonumber(ARGV[10])
  local ok = (tonumber(state[2]) or 0) + 1
  if state[3] ~= '0' or ok >= limit then
    ok = 0
    limit = math.min(tonumber(ARGV[9]), limit + 1)
  end
  redis.call('HSET', KEYS[6], 'limit', string.format('%.6f', limit), 'ok', ok,
             'last_ok', fmt(now))
  redis.call('HINCRBY', KEYS[6], 'oks', 1)
  local charged = tonumber(ARGV[13])
  if charged > 0 then redis.call('HINCRBY', KEYS[6], 'ok_tokens', charged) end
end
if outcome ~= '' then redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[12])) end
local last_ok = tonumber(redis.call('HGET', KEYS[6], 'last_ok'))
local age = -1
if last_ok then age = math.max(0, now - last_ok) end
local out = {held, string.format('%.6f', limit), cut, fmt(age)}
for _, value in ipairs(counters(KEYS[6])) do out[#out + 1] = value end
return out
