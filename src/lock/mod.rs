//! The lock engine: flock-based locks with a fair ticket queue.

pub mod name;
