//! The read models kept from the event log (rule R8): the Redis follower,
//! which projects each committed entry into Redis after the batch that wrote
//! it, and the rebuild of the MySQL and Redis read models from the log
//! alone.

pub mod rebuild;
pub mod redis_follower;
