-- Shared by every script: Redis' TIME in milliseconds (with fractions), number
-- formatting (Lua's default keeps only 14 digits), GCRA arrival times, and the fleet's
-- counters of a lane.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function fmt(x) return string.format('%.3f', x) end
-- A GCRA key holds the theoretical arrival time (TAT); absent or past means a full bucket.
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  return tat
end
local function set_tat(key, tat)
  if tat <= now then
    redis.call('DEL', key)
  else
    redis.call('SET', key, fmt(tat), 'PX', math.ceil(tat - now) + 1000)
  end
end
-- What the whole fleet sent and had accepted of a lane (calls and tokens), ever: each
-- process tells from the growth between two of its own calls what the others did meanwhile.
local function counters(control)
  local c = redis.call('HMGET', control, 'sent', 'oks', 'sent_tokens', 'ok_tokens')
  return {c[1] or '0', c[2] or '0', c[3] or '0', c[4] or '0'}
end
