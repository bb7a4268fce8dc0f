-- Input that could not be decoded or broke a rule (rule R10): kept whole, with
-- the reason, so that nothing is lost. Also published to the dead-letter topic.
CREATE TABLE dead_letters (
    id BIGINT NOT NULL AUTO_INCREMENT,
    source_topic VARCHAR(249) NOT NULL,
    source_partition INT NOT NULL,
    source_offset BIGINT NOT NULL,
    message_key BLOB NULL,
    payload LONGBLOB NULL,
    content_type VARCHAR(255) NULL,
    -- Stable machine-readable reason, e.g. id_bound_to_other_order.
    reason VARCHAR(64) NOT NULL,
    -- Human-readable explanation.
    error TEXT NOT NULL,
    -- What could be read of the event, when it decoded.
    event_id VARCHAR(128) NULL,
    order_id VARCHAR(64) NULL,
    created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    -- A redelivered message is dead-lettered once.
    UNIQUE KEY uq_dead_letters_source (source_topic, source_partition, source_offset),
    KEY idx_dead_letters_reason (reason)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
