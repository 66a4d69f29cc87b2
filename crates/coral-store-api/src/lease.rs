//! Leases: how several processes (or machines) write one store at the same time.
//!
//! A store that many writers may share (an S3 prefix) coordinates them with leases, taken
//! through [`ManifestStore::acquire_lease`](crate::ManifestStore::acquire_lease):
//!
//! - a writer that adds references (stores weights and deltas, then the manifest that names
//!   them: `coral add`, a sync into the store) holds a [`LeaseKind::Shared`] lease for its
//!   duration; shared leases never exclude each other;
//! - `coral gc` holds a [`LeaseKind::Exclusive`] lease while it decides what no model needs and
//!   deletes it, so no writer can reference a weight between gc's decision and the delete.
//!
//! Stores with a single writer at a time (an HDF5 file, under its file lock) or a single process
//! (the memory store) need none of this: their provided methods hand out a [`Lease`] that holds
//! nothing. `docs/format.md` ("Leases") describes the S3 protocol.

use std::time::Duration;

use serde::Serialize;

/// The kind of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// Held by writers that add references; any number at once.
    Shared,
    /// Held by a garbage collector; excludes every other lease.
    Exclusive,
}

impl LeaseKind {
    /// `"shared"` or `"exclusive"`.
    pub fn name(self) -> &'static str {
        match self {
            LeaseKind::Shared => "shared",
            LeaseKind::Exclusive => "exclusive",
        }
    }

    /// Parses [`LeaseKind::name`].
    pub fn parse(s: &str) -> Option<LeaseKind> {
        match s {
            "shared" => Some(LeaseKind::Shared),
            "exclusive" => Some(LeaseKind::Exclusive),
            _ => None,
        }
    }

    /// True when a lease of this kind cannot be held beside one of `other`'s.
    pub fn conflicts_with(self, other: LeaseKind) -> bool {
        self == LeaseKind::Exclusive || other == LeaseKind::Exclusive
    }
}

impl std::fmt::Display for LeaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A lease taken with [`ManifestStore::acquire_lease`](crate::ManifestStore::acquire_lease).
///
/// Give it back with [`ManifestStore::release_lease`](crate::ManifestStore::release_lease); a
/// store releases the leases still held when it is closed or dropped. A store that needs no
/// leases hands out one that holds nothing ([`Lease::none`]).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a lease is held until released (or until its store is closed)"]
pub struct Lease {
    kind: LeaseKind,
    id: Option<String>,
}

impl Lease {
    /// A lease that holds nothing: what stores with a single writer hand out.
    pub fn none(kind: LeaseKind) -> Self {
        Lease { kind, id: None }
    }

    /// A lease held under the store's identifier `id` (for backends).
    pub fn held(kind: LeaseKind, id: impl Into<String>) -> Self {
        Lease {
            kind,
            id: Some(id.into()),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> LeaseKind {
        self.kind
    }

    /// The store's identifier of the lease, when it holds one.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// True when the lease holds something in its store.
    pub fn is_held(&self) -> bool {
        self.id.is_some()
    }
}

/// What [`ManifestStore::remove_leftovers`](crate::ManifestStore::remove_leftovers) found (and
/// removed, unless it was a dry run): the remains of writes that never finished.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Leftovers {
    /// Data objects that no commit object commits (uploads interrupted after the data).
    pub data_objects: usize,
    /// Reference markers of deltas that do not exist.
    pub markers: usize,
    /// Multipart uploads never completed nor aborted.
    pub uploads: usize,
}

impl Leftovers {
    /// The sum of the three counts.
    pub fn total(&self) -> usize {
        self.data_objects + self.markers + self.uploads
    }
}

/// How long a lease that its holder stopped refreshing keeps others waiting before it is
/// ignored (and may be removed by a garbage collector): 30 minutes.
pub const DEFAULT_LEASE_STALE_AFTER: Duration = Duration::from_secs(30 * 60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        use LeaseKind::*;
        assert!(!Shared.conflicts_with(Shared));
        assert!(Shared.conflicts_with(Exclusive));
        assert!(Exclusive.conflicts_with(Shared));
        assert!(Exclusive.conflicts_with(Exclusive));
        for k in [Shared, Exclusive] {
            assert_eq!(LeaseKind::parse(k.name()), Some(k));
        }
        assert_eq!(LeaseKind::parse("other"), None);
        let l = Lease::none(Shared);
        assert!(!l.is_held() && l.id().is_none());
        let l = Lease::held(Exclusive, "x");
        assert!(l.is_held() && l.id() == Some("x") && l.kind() == Exclusive);
    }
}
