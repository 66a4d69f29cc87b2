//! A server that goes away in the middle of `store_batch`, then comes back.
//!
//! The test starts its own moto server (the venv's `moto_server`, beside `CORAL_TEST_PYTHON`)
//! and puts a small TCP proxy between the store and it. moto keeps its state in memory, so
//! killing it would lose what was stored before the failure; cutting the proxy instead makes the
//! server unreachable for the client exactly as a crash would (open connections reset, new ones
//! refused) while keeping the server's state, so the resume can be checked: the second run
//! uploads only what is missing and everything verifies.

#[path = "../../coral-s3/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coral_core::ContentHash;
use coral_s3::{BatchError, S3Store};
use coral_store_api::{testenv, MemoryStore, StoreError, WeightStore};
use coral_sync::SyncExt;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_moto(python: &std::path::Path) -> (Server, SocketAddr) {
    let moto = python.parent().unwrap().join("moto_server");
    let port = free_port();
    let child = Command::new(&moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", moto.display()));
    let server = Server(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, addr)
}

/// A loopback TCP proxy that can be cut (every connection reset, new ones closed at once) and
/// restored. It cuts itself once `limit` bytes went from the client to the server.
#[derive(Clone)]
struct Proxy {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    limit: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = Proxy {
            addr: listener.local_addr().unwrap(),
            down: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(AtomicU64::new(0)),
            limit: Arc::new(AtomicU64::new(u64::MAX)),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        let p2 = p.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if p2.down.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut c = p2.conns.lock().unwrap();
                    c.push(client.try_clone().unwrap());
                    c.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = p2.clone();
                std::thread::spawn(move || up.pump(client, server, true));
                let down = p2.clone();
                std::thread::spawn(move || down.pump(s2, c2, false));
            }
        });
        p
    }

    fn pump(&self, mut from: TcpStream, mut to: TcpStream, upstream: bool) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if self.down.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                break;
            }
            if upstream {
                let total = self.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if total >= self.limit.load(Ordering::SeqCst) {
                    self.cut();
                    break;
                }
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.limit.store(u64::MAX, Ordering::SeqCst);
        self.down.store(false, Ordering::SeqCst);
    }
}

#[test]
fn server_gone_mid_batch_then_back_resume_uploads_only_what_is_missing() {
    let Some(python) = testenv::python() else {
        return;
    };
    let Some(model) = testenv::model_path() else {
        return;
    };
    let weights = common::model::load_model(&model, false);
    let model_bytes: u64 = weights.iter().map(|(_, w)| w.nbytes() as u64).sum();
    let all_keys: BTreeSet<ContentHash> = weights.iter().map(|(_, w)| w.compute_hash()).collect();

    let (_server, moto) = start_moto(&python);
    let proxy = Proxy::start(moto);
    let endpoint = format!("http://{}", proxy.addr);
    let config = common::config(&endpoint, &common::unique_bucket("fault"))
        .with_compression("zstd-3".parse().unwrap())
        .with_max_concurrency(4)
        .with_retries(1, Duration::from_secs(3));
    let store = common::open(config);

    // Cut the server off once a sixth of the model's bytes went up.
    proxy.forwarded.store(0, Ordering::SeqCst);
    proxy.limit.store(model_bytes / 6, Ordering::SeqCst);
    let err = store.store_batch(&weights).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("stored") && msg.contains("not stored"),
        "{msg}"
    );
    let StoreError::Backend { source, .. } = &err else {
        panic!("expected a backend error, got {err:?}");
    };
    let batch = source
        .downcast_ref::<BatchError>()
        .unwrap_or_else(|| panic!("the source is not a BatchError: {source}"));
    assert!(
        !batch.stored.is_empty(),
        "nothing was stored before the cut"
    );
    assert!(
        !batch.failed.is_empty(),
        "nothing failed: the cut came too late"
    );
    assert_eq!(batch.stored.len() + batch.failed.len(), weights.len());
    eprintln!(
        "cut after {} bytes: {} stored, {} not stored; {msg}",
        proxy.forwarded.load(Ordering::SeqCst),
        batch.stored.len(),
        batch.failed.len()
    );

    // While the server is away, reads fail clearly too (no hang, no false "absent").
    let some = batch.stored[0].1;
    assert!(store.exists(&some).is_err());

    proxy.restore();
    // Never half a weight: everything that counts as present loads and verifies, and everything
    // reported stored is present.
    let present: BTreeSet<ContentHash> = store.list_weights().unwrap().into_iter().collect();
    for (_, k) in &batch.stored {
        assert!(present.contains(k), "{k} reported stored but absent");
    }
    assert!(present.is_subset(&all_keys));
    let loaded = store
        .load_batch(&present.iter().copied().collect::<Vec<_>>())
        .unwrap();
    assert_eq!(loaded.len(), present.len());

    // Resume through the seed's sync: only what is missing goes up.
    let local = MemoryStore::new();
    local.store_batch(&weights).unwrap();
    let stats = store.sync_from_local(&local).unwrap();
    assert_eq!(stats.uploaded as usize, all_keys.len() - present.len());
    assert_eq!(stats.skipped as usize, present.len());
    let again = store.sync_from_local(&local).unwrap();
    assert_eq!(again.uploaded, 0);
    assert_eq!(again.bytes_transferred, 0);

    // Everything verifies, bit for bit.
    let keys: Vec<ContentHash> = all_keys.iter().copied().collect();
    let back = store.load_batch(&keys).unwrap();
    assert_eq!(back.len(), keys.len());
    for (name, w) in &weights {
        let got = &back[&w.compute_hash()];
        assert!(got.data() == w.data(), "{name} differs");
    }
    assert!(store.remove_orphans(Duration::ZERO).is_ok());
    drop(store);
    let _ = S3Store::new; // the store type under test
}
