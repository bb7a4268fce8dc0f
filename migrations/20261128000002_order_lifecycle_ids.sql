-- The read model the existing platform reads: every lifecycle id ever issued,
-- with its order, type, status and replacement chain. Legacy columns first,
-- unchanged; the columns after `updated_at` are this service's additions.
-- A pure function of lifecycle_events (rule R8).
CREATE TABLE order_lifecycle_ids (
    id BIGINT NOT NULL AUTO_INCREMENT,
    order_id VARCHAR(64) NOT NULL,
    id_type ENUM('order_id', 'stoploss_id', 'takeprofit_id', 'stoploss_cancel_id',
                 'takeprofit_cancel_id', 'close_id', 'cancel_id', 'modify_id') NOT NULL,
    lifecycle_id VARCHAR(64) NOT NULL,
    -- 'rejected' extends the legacy four: the provider refused the request.
    status ENUM('active', 'replaced', 'cancelled', 'executed', 'rejected') NOT NULL DEFAULT 'active',
    replaced_by VARCHAR(64) NULL,
    notes TEXT NULL,
    -- Event time (UTC) of the event that issued the id / last changed it.
    created_at DATETIME(3) NOT NULL,
    updated_at DATETIME(3) NOT NULL,
    -- For cancel-type ids: the id whose cancellation was requested.
    target_id VARCHAR(64) NULL,
    -- Log sequence numbers (lifecycle_events.seq) that issued / last changed it.
    issued_seq BIGINT NOT NULL,
    updated_seq BIGINT NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY uq_order_lifecycle_ids_lifecycle_id (lifecycle_id),
    KEY idx_order_lifecycle_ids_order_id (order_id),
    KEY idx_order_lifecycle_ids_order_type_status (order_id, id_type, status)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
