//! The seed's `sync_from_local` / `sync_to_local` against real S3-compatible servers (moto and
//! Garage, started by `cargo xtask test`), through [`coral_sync::SyncExt`].

#[path = "../../coral-s3/tests/common/mod.rs"]
mod common;

use coral_store_api::WeightStore;
use coral_sync::SyncExt;

#[test]
fn sync_both_ways_carries_weights_deltas_and_manifests() {
    use coral_store_api::testing::manifests::populated_store;
    use coral_store_api::{DeltaStore, ManifestStore, MemoryStore};

    for e in common::engines() {
        let (local, m, _, dk) = populated_store(5, 7);
        let tuned = local.load(&dk).unwrap().unwrap();

        let s3 = common::open(common::engine_config(&e, &common::unique_bucket("sync")));
        let up = s3.sync_from_local(&local).unwrap();
        assert_eq!(up.uploaded, 5 + 1 + 1 + 1, "{up:?}");
        assert_eq!(up.details.deltas.moved, 1);
        assert_eq!(up.skipped, 0);
        assert!(up.bytes_transferred > 0);
        // The delta weight rebuilds from S3 alone.
        assert_eq!(s3.load(&dk).unwrap().unwrap().data(), tuned.data());
        assert_eq!(s3.get_manifest(&m.name).unwrap(), Some(m.clone()));
        let again = s3.sync_from_local(&local).unwrap();
        assert_eq!((again.uploaded, again.bytes_transferred), (0, 0));

        // Pull into a fresh local store: the same results the other way.
        let other = MemoryStore::new();
        let down = s3.sync_to_local(&other).unwrap();
        assert_eq!(down.downloaded, up.uploaded);
        assert_eq!(down.bytes_transferred, up.bytes_transferred);
        assert_eq!(other.list_weights().unwrap(), local.list_weights().unwrap());
        assert_eq!(other.list_deltas().unwrap(), vec![dk]);
        assert_eq!(other.get_manifest(&m.name).unwrap(), Some(m));
        for k in local.list_weights().unwrap() {
            assert_eq!(
                other.load(&k).unwrap().unwrap().data(),
                local.load(&k).unwrap().unwrap().data()
            );
        }
        assert_eq!(s3.sync_to_local(&other).unwrap().downloaded, 0);
    }
}

#[test]
fn a_sync_with_nothing_to_move_takes_no_lease_and_waits_for_no_gc() {
    use coral_store_api::testing::manifests::populated_store;
    use coral_store_api::{LeaseKind, ManifestStore};
    use std::time::{Duration, Instant};

    for e in common::engines() {
        let (local, _, _, _) = populated_store(3, 11);
        let s3 = common::open(common::engine_config(&e, &common::unique_bucket("noop")));
        s3.sync_from_local(&local).unwrap();
        // A garbage collector holds the prefix: a sync that has something to move must wait
        // for it, one that has nothing to move need not.
        let gc = s3
            .acquire_lease(LeaseKind::Exclusive, "gc", Duration::ZERO)
            .unwrap();
        let start = Instant::now();
        let again = s3.sync_from_local(&local).unwrap();
        assert_eq!((again.uploaded, again.bytes_transferred), (0, 0));
        assert!(!again.details.dry_run);
        assert!(again.skipped > 0, "{again:?}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a no-op sync waited for the gc's lease: {:?}",
            start.elapsed()
        );
        s3.release_lease(gc).unwrap();
    }
}
