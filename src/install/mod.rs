//! What collectors need to join a fleet: install tokens (and, later, install files).

pub mod token;
