-- Next Kafka offset per partition, written in the same transaction as the
-- events it covers: offsets follow the data, never lead it.
CREATE TABLE consumer_offsets (
    group_id VARCHAR(255) NOT NULL,
    topic VARCHAR(249) NOT NULL,
    kafka_partition INT NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (group_id, topic, kafka_partition)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- How far each follower projection (Redis) has applied the log, by
-- lifecycle_events.position.
CREATE TABLE projection_checkpoints (
    name VARCHAR(64) NOT NULL,
    position BIGINT NOT NULL,
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
