-- A waiter leaves the fleet's queues: admitted or given up.
-- KEYS: as lane_gate.lua's (the model lane's waiters, heartbeats and starvation credit, the
-- client's waiters and heartbeats). ARGV: waiter id, admitted (1/0), it overtook a higher lane
-- (1/0), starvation share, credit ttl ms.
-- Every admission while others wait adds the share to the credit (at most a whole one); an
-- overtaking one spends a whole credit. Uncontended admissions leave no key behind. Returns
-- the credit.
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[4], KEYS[5]}) do redis.call('ZREM', key, ARGV[1]) end
local credit = tonumber(redis.call('GET', KEYS[3])) or 0
local contended = redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[4]) == 1
if ARGV[2] == '1' and (ARGV[3] == '1' or contended) then
  credit = math.min(1, credit + tonumber(ARGV[4]))
  if ARGV[3] == '1' then credit = credit - 1 end
  redis.call('SET', KEYS[3], string.format('%.6f', credit), 'PX', tonumber(ARGV[5]))
end
return string.format('%.6f', credit)
