//! What collectors need to join a fleet: install tokens and install files.

pub mod artifacts;
pub mod bundle;
pub mod export;
pub mod files;
pub mod seal;
pub mod supervisor;
pub mod token;
pub mod writer;
