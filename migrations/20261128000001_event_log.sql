-- The append-only event log: the truth (rule R8). One row per input event that
-- was taken (applied, acknowledged, duplicate or conflict); rejected input
-- goes to dead_letters instead.
CREATE TABLE lifecycle_events (
    -- Global append position; the Redis projection follows it.
    position BIGINT NOT NULL AUTO_INCREMENT,
    order_id VARCHAR(64) NOT NULL,
    -- Per-order sequence: 1, 2, 3, ... with no gap and no duplicate.
    seq BIGINT NOT NULL,
    -- The producer's idempotency key (rule R9).
    event_id VARCHAR(128) NOT NULL,
    -- The contract's oneof member, e.g. stop_loss_added.
    kind VARCHAR(32) NOT NULL,
    outcome ENUM('applied', 'acknowledged', 'duplicate', 'conflict') NOT NULL,
    -- JSON array of the transitions the event caused, in order.
    transitions LONGTEXT NOT NULL CHECK (JSON_VALID(transitions)),
    -- The input event in the contract's JSON form.
    payload LONGTEXT NOT NULL CHECK (JSON_VALID(payload)),
    occurred_at_ms BIGINT NOT NULL,
    -- Where it was read from; NULL for synthetic events (legacy import).
    source_topic VARCHAR(249) NULL,
    source_partition INT NULL,
    source_offset BIGINT NULL,
    recorded_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (position),
    UNIQUE KEY uq_lifecycle_events_order_seq (order_id, seq),
    UNIQUE KEY uq_lifecycle_events_event_id (event_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TRIGGER lifecycle_events_append_only_update BEFORE UPDATE ON lifecycle_events
FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'lifecycle_events is append-only';

CREATE TRIGGER lifecycle_events_append_only_delete BEFORE DELETE ON lifecycle_events
FOR EACH ROW SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'lifecycle_events is append-only';
