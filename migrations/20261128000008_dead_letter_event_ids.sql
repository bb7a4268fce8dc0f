-- Rule R9 covers dead-lettered events too: an event_id that was rejected once
-- is a duplicate when it comes again (a redelivery, a replay), so that replaying
-- a topic over a healthy store changes nothing. The pipeline looks it up here.
CREATE INDEX idx_dead_letters_event_id ON dead_letters (event_id);
