-- Rule R7 in stream time: a parked event expires once the partitions that
-- could still issue its id have moved past it by the park timeout, measured by
-- their Kafka timestamps, not by the wall clock. A backlog drained hours late
-- then parks and releases exactly as it would have live.
--
-- expires_at_ms: the parked message's Kafka timestamp plus the park timeout.
-- Existing rows keep the wall-clock limit they had.
ALTER TABLE parked_events ADD COLUMN expires_at_ms BIGINT NULL;
UPDATE parked_events
   SET expires_at_ms = CAST(UNIX_TIMESTAMP(expires_at) * 1000 AS SIGNED);
ALTER TABLE parked_events
    MODIFY expires_at_ms BIGINT NOT NULL,
    DROP KEY idx_parked_events_expires,
    DROP COLUMN expires_at,
    ADD KEY idx_parked_events_expires_ms (expires_at_ms);

-- How far in stream time each partition has been consumed: the newest Kafka
-- timestamp applied from it, or, while the partition is caught up to its
-- end, the time it was last seen caught up. The lowest value of a group's
-- partitions is the point in stream time up to which nothing more can arrive.
ALTER TABLE consumer_offsets ADD COLUMN stream_time_ms BIGINT NULL;
