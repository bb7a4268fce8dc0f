-- How many events wait in parked_events, kept in step by every insert and
-- delete of the parking lot, in the same transaction, so that the total cap
-- (--max-parked) costs one primary-key read per batch instead of a COUNT(*)
-- over a table that may hold a million rows.
CREATE TABLE parking_lot (
    id TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    parked BIGINT NOT NULL
) ENGINE=InnoDB;

INSERT INTO parking_lot (id, parked) SELECT 1, COUNT(*) FROM parked_events;
