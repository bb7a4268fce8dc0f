-- Rule R12: log positions are dense and become visible in commit order, so a
-- follower (the Redis projection) reads the log by position and never skips
-- an entry or waits on a hole.
--
-- Positions used to come from AUTO_INCREMENT, taken at insert time: a slower
-- transaction could commit a lower position after a higher one, and every
-- rollback left a permanent hole. Now every append takes its positions from
-- this one-row counter, as the last write of its transaction: the row lock is
-- held from the append to the commit, so appends commit one after another in
-- position order, and a rollback returns its positions to the next writer.
--
-- log_id names this log: created with the database, it never changes. A read
-- model stores it beside its position, so a Redis that followed another log
-- (a recreated database) is re-projected from the start.
CREATE TABLE log_head (
    id TINYINT NOT NULL,
    log_id CHAR(36) NOT NULL,
    -- The highest position appended (0 for an empty log).
    position BIGINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = ascii COLLATE = ascii_bin;

-- Existing logs keep their positions and their order; a hole left by an old
-- rollback stays a hole, which a follower reading by position steps over.
INSERT INTO log_head (id, log_id, position)
SELECT 1, UUID(), COALESCE(MAX(position), 0) FROM lifecycle_events;

ALTER TABLE lifecycle_events MODIFY position BIGINT NOT NULL;
