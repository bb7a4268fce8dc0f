-- Batches load order state from order_lifecycle_ids and take this row in
-- share mode first; `rebuild` takes it exclusively while it swaps in a new
-- order_lifecycle_ids, so that no batch reads a table that is being replaced.
CREATE TABLE projection_lock (
    id TINYINT NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;

INSERT INTO projection_lock (id) VALUES (1);
