//! # coral-cli
//!
//! The `coral` command: argument parsing and printing (`src/main.rs`) over the libraries that
//! do the work: `coral-models` (add, export, diff, verify, repair, gc on any store),
//! `coral-open` (a store from its address), `coral-sync` (between two stores) and
//! `coral-formats` (the model files). This library keeps only what the binary needs and tests
//! drive directly: [`guard`], which runs a command on a local store in a child process so a
//! crash is reported in one line, and [`duration`], how `--grace` is read and printed.
//!
//! ```
//! use coral_cli::duration::{format_duration, parse_duration};
//!
//! let grace = parse_duration("1.5h")?;
//! assert_eq!(grace.as_secs(), 5400);
//! assert_eq!(format_duration(grace), "90m");
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod duration;
pub mod guard;
