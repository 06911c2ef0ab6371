-- KEYS: sorted sets; ARGV[1]: lease ms; ARGV[i + 1]: the permit id leased in KEYS[i].
-- Returns the ids whose lease was gone (reaped after expiring).
local lease = tonumber(ARGV[1])
local expiry = fmt(now + lease)
local lost = {}
for i, key in ipairs(KEYS) do
  local id = ARGV[i + 1]
  if redis.call('ZSCORE', key, id) then
    redis.call('ZADD', key, expiry, id)
    redis.call('PEXPIRE', key, 2 * lease)
  else
    lost[#lost + 1] = id
  end
end
return lost
