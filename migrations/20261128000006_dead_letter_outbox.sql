-- dead_letters doubles as the outbox of the dead-letter topic: a letter is
-- written with the batch that rejected it and published afterwards, so a
-- crash in between delays its publication but never loses it.
ALTER TABLE dead_letters
    ADD COLUMN published_at DATETIME(3) NULL,
    ADD KEY idx_dead_letters_unpublished (published_at, id);
