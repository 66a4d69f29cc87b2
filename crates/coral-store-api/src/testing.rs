//! The conformance suite (feature `testing`).
