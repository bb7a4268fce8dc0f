-- Events waiting for a lifecycle id that no event has issued yet (rule R7):
-- a provider confirmation that overtook its request on another partition, or
-- a cancel naming an id not seen yet. Applied, in arrival order, by the batch
-- that issues the awaited id; dead-lettered as unknown_lifecycle_id once
-- expires_at passes.
CREATE TABLE parked_events (
    id BIGINT NOT NULL AUTO_INCREMENT,
    awaited_id VARCHAR(64) NOT NULL,
    event_id VARCHAR(128) NOT NULL,
    -- The decoded event in contract JSON.
    event LONGTEXT NOT NULL CHECK (JSON_VALID(event)),
    -- The original message, for the dead-letter record if it expires.
    source_topic VARCHAR(249) NOT NULL,
    source_partition INT NOT NULL,
    source_offset BIGINT NOT NULL,
    message_key BLOB NULL,
    payload LONGBLOB NULL,
    content_type VARCHAR(255) NULL,
    parked_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    expires_at DATETIME(3) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_parked_events_event_id (event_id),
    KEY idx_parked_events_awaited (awaited_id),
    KEY idx_parked_events_expires (expires_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
