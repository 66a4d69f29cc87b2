//! Helpers for Coral's end-to-end tests: where the real model and the test servers are.
