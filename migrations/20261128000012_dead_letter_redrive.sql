-- A dead letter can be redriven once its refusal is fixed (`redrive`): the
-- message goes through the pipeline again, and its row, marked here in the
-- same transaction, no longer makes its event_id a duplicate (rule R9). If
-- the message is refused again, its row takes the new reason and is
-- published again (the column is cleared).
ALTER TABLE dead_letters ADD COLUMN redriven_at DATETIME(3) NULL;
