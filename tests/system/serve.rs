//! `gitfleet serve` end to end.
