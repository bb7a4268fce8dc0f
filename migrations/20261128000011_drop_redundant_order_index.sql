-- Every batch writes order_lifecycle_ids, so every index on it is paid for on
-- the hot path. idx_order_lifecycle_ids_order_id (order_id) is a prefix of
-- idx_order_lifecycle_ids_order_type_status (order_id, id_type, status),
-- which serves every lookup by order as well: the shorter one only costs.
ALTER TABLE order_lifecycle_ids DROP KEY idx_order_lifecycle_ids_order_id;
