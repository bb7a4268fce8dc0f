-- The schema registry id of the message a log entry was read from, when it
-- came in the registry's frame (NULL for plain protobuf or JSON, and for
-- synthetic entries). A nullable column at the end: added instantly, the
-- existing rows untouched.
ALTER TABLE lifecycle_events ADD COLUMN schema_id INT UNSIGNED NULL;
