//! # coral-sync
//!
//! Copies weights, deltas and model manifests between any two Coral stores, through the store
//! traits alone.
