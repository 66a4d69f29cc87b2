//! `store_batch`: hashing, compression and writing in one pipeline.
//!
//! The thread that holds HDF5's lock runs an event loop. It hands tensors to the compression
//! threads to hash, largest first and only a couple at a time, so that while one thread hashes a
//! large tensor the others compress and this thread writes the tensors hashed before it. As each
//! key arrives it checks under the lock whether the weight is new; the chunks of a new one are
//! compressed (at most [`IN_FLIGHT_BYTES`] ahead of the writes) and written into an anonymous
//! dataset as each is ready. Datasets get their attributes once every tensor of the batch is
//! hashed and their link in `weights/` only once every chunk of the batch is written, so a batch
//! that fails anywhere (a wrong key, a compression or write error) links nothing.
//!
//! The threads finish in any order, but the writer takes their results one at a time in the
//! order it handed out the work, holding early finishers until their turn, and hands out more
//! work only between two results: the same batch gives the same sequence of HDF5 calls, and so
//! the same file, byte for byte, on every run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};

use coral_core::{ContentHash, WeightTensor};
use coral_store_api::{Result, StoreError};

use crate::chunk::ChunkError;
use crate::h5::{self, Hid};
use crate::store::{
    corrupt, in_compression_scope, take_largest, Encoded, HDF5Store, Inner, IN_FLIGHT_BYTES,
};

/// Hash tasks handed to the compression threads at a time: enough to keep a thread hashing
/// while the others compress what is already hashed.
const HASHES_AHEAD: usize = 2;

/// What the writer asks the compression threads to do.
enum Job {
    /// Hash item `.1`, the `.0`-th job handed out.
    Hash(u64, usize),
    /// Compress chunk `.2` of plan `.1`, the `.0`-th job handed out.
    Chunk(u64, usize, usize, Arc<Encoded>),
}

/// What the compression threads report to the writer.
enum Event {
    /// Item `.1` (the `.0`-th job) hashed to `.2`, or failed (a wrong key given, or a panic).
    Hashed(u64, usize, Result<ContentHash>),
    /// Chunk `.2` of plan `.1` (the `.0`-th job) compressed, with its filter mask.
    Chunk(
        u64,
        usize,
        usize,
        std::result::Result<(Vec<u8>, u32), ChunkError>,
    ),
}

impl HDF5Store {
    /// Stores `items` (name, weight, key or None to compute) and flushes; returns each name's
    /// key.
    pub(crate) fn store_many(
        &self,
        items: &[(String, &WeightTensor, Option<ContentHash>)],
    ) -> Result<BTreeMap<String, ContentHash>> {
        let mut keys: Vec<Option<ContentHash>> = vec![None; items.len()];
        self.with_write(|inner| self.ingest(inner, items, &mut keys))?;
        self.with_write(|inner| self.flush(inner))?;
        items
            .iter()
            .zip(keys)
            .map(|((name, _, _), k)| {
                k.map(|k| (name.clone(), k))
                    .ok_or_else(|| corrupt(&self.path, "", format!("{name:?} was not hashed")))
            })
            .collect()
    }

    /// The event loop of [`HDF5Store::store_many`]. Call under the lock.
    fn ingest(
        &self,
        inner: &Inner,
        items: &[(String, &WeightTensor, Option<ContentHash>)],
        keys: &mut [Option<ContentHash>],
    ) -> Result<()> {
        let algorithm = self.opts.hash_algorithm;
        let mut to_hash: Vec<usize> = (0..items.len()).collect();
        to_hash.sort_by_key(|&i| std::cmp::Reverse(items[i].1.nbytes()));
        let mut to_hash = VecDeque::from(to_hash);
        let (tx, rx) = mpsc::channel::<Event>();
        // Buffers of written chunks are reused for the next ones: no fresh memory per chunk.
        let buffers: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        let hash = |i: usize| -> Result<ContentHash> {
            let (_, w, given) = &items[i];
            let actual = w.compute_hash_with(given.map(|k| k.algorithm()).unwrap_or(algorithm));
            match given {
                Some(k) if *k != actual => Err(StoreError::KeyMismatch {
                    name: w.name().to_owned(),
                    key: *k,
                    actual,
                }),
                _ => Ok(actual),
            }
        };
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let stopped = || corrupt(&self.path, "", "storing: the compression threads stopped");
        std::thread::scope(|scope| -> Result<()> {
            // Tasks are spawned from a plain thread of our own, never from this one: waiting for
            // them at the end makes a rayon worker run other rayon work, which on a thread that
            // holds the store (an application storing from rayon's pool) could be another store
            // call waiting for this very store.
            let (tx, hash, buffers) = (tx.clone(), &hash, &buffers);
            let spawner = scope.spawn(move || {
                in_compression_scope(|rs| {
                    for job in job_rx {
                        let tx = tx.clone();
                        match job {
                            Job::Hash(seq, i) => rs.spawn(move |_| {
                                let r = std::panic::catch_unwind(AssertUnwindSafe(|| hash(i)))
                                    .unwrap_or_else(|_| {
                                        Err(StoreError::backend(
                                            "hashing",
                                            std::io::Error::other("a hashing thread panicked"),
                                        ))
                                    });
                                let _ = tx.send(Event::Hashed(seq, i, r));
                            }),
                            Job::Chunk(seq, p, c, plan) => rs.spawn(move |_| {
                                let done = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                    let mut buf = take_largest(buffers);
                                    plan.encode_chunk(c, &mut buf).map(|mask| (buf, mask))
                                }))
                                .unwrap_or_else(|_| {
                                    Err(ChunkError("a compression thread panicked".into()))
                                });
                                // The writer may have stopped on an error: nothing to do then.
                                let _ = tx.send(Event::Chunk(seq, p, c, done));
                            }),
                        }
                    }
                })
            });
            let mut hashing = 0usize;
            let mut in_flight = 0usize;
            let mut plans: Vec<Arc<Encoded>> = Vec::new();
            // The first item (in batch order) of each plan's key: its metadata is written.
            let mut first: Vec<usize> = Vec::new();
            // Each key seen: its plan, or None when already stored.
            let mut by_key: HashMap<ContentHash, Option<usize>> = HashMap::new();
            let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
            let mut open: HashMap<usize, (Hid, usize)> = HashMap::new();
            let mut written: Vec<(usize, Hid)> = Vec::new();
            // Written, with their attributes, waiting for the end of the batch to be linked.
            let mut complete: Vec<(usize, Hid)> = Vec::new();
            // Results waiting for their turn, by job number.
            let mut done_jobs: BTreeMap<u64, Event> = BTreeMap::new();
            let (mut next_seq, mut next_turn) = (0u64, 0u64);
            let result = (|| -> Result<()> {
                loop {
                    // Chunks of what is hashed first, then the next tensor to hash: the
                    // threads take tasks in order, so compression never waits behind hashing.
                    while let Some(&(p, c)) = queue.front() {
                        let plan = &plans[p];
                        let cost = plan.chunk_bytes();
                        if in_flight > 0 && in_flight + cost > IN_FLIGHT_BYTES {
                            break;
                        }
                        queue.pop_front();
                        in_flight += cost;
                        jobs.send(Job::Chunk(next_seq, p, c, Arc::clone(plan)))
                            .map_err(|_| stopped())?;
                        next_seq += 1;
                    }
                    while hashing < HASHES_AHEAD {
                        let Some(i) = to_hash.pop_front() else { break };
                        jobs.send(Job::Hash(next_seq, i)).map_err(|_| stopped())?;
                        next_seq += 1;
                        hashing += 1;
                    }
                    let all_hashed = hashing == 0 && to_hash.is_empty();
                    if all_hashed {
                        // Every key is right (and each first name known): the attributes of
                        // what is written, `hash` last.
                        for (p, dset) in written.drain(..) {
                            Self::weight_attrs(
                                items[first[p]].1.metadata(),
                                &plans[p].key,
                                dset.id(),
                            )
                            .map_err(|e| self.err(e))?;
                            complete.push((p, dset));
                        }
                        if in_flight == 0 && queue.is_empty() {
                            // Everything is written: only now does any of it get a name, so a
                            // batch that fails anywhere before this links nothing.
                            for (p, dset) in complete.drain(..) {
                                h5::link_object(dset.id(), inner.weights.id(), &plans[p].key)
                                    .map_err(|e| self.err(e))?;
                            }
                            return Ok(());
                        }
                    }
                    // The next result in turn, one per round, so that what is handed out
                    // next depends only on what came before, never on timing.
                    let event = loop {
                        if let Some(e) = done_jobs.remove(&next_turn) {
                            next_turn += 1;
                            break e;
                        }
                        let e = rx.recv().map_err(|_| {
                            corrupt(&self.path, "", "storing: the compression threads stopped")
                        })?;
                        let seq = match &e {
                            Event::Hashed(seq, ..) | Event::Chunk(seq, ..) => *seq,
                        };
                        done_jobs.insert(seq, e);
                    };
                    match event {
                        Event::Hashed(_, i, key) => {
                            hashing -= 1;
                            let key = key?;
                            keys[i] = Some(key);
                            if let Some(plan) = by_key.get(&key) {
                                if let Some(p) = *plan {
                                    first[p] = first[p].min(i);
                                }
                                continue;
                            }
                            let hex = key.to_hex();
                            if self.weight_present(inner, &hex)? {
                                by_key.insert(key, None);
                                continue;
                            }
                            // A leftover of an interrupted write (no `hash` attribute) is
                            // replaced.
                            if h5::link_exists(inner.weights.id(), &hex).map_err(|e| self.err(e))? {
                                self.unlink(inner.weights.id(), &hex)?;
                            }
                            let w = items[i].1;
                            let plan = self.encode(hex, w.dtype(), w.shape(), w.data())?;
                            let p = plans.len();
                            let n = plan.n_chunks();
                            plans.push(Arc::new(plan));
                            first.push(i);
                            by_key.insert(key, Some(p));
                            if n == 0 {
                                written.push((p, self.create_dataset(inner, &plans[p])?));
                            } else {
                                queue.extend((0..n).map(|c| (p, c)));
                            }
                        }
                        Event::Chunk(_, p, c, done) => {
                            let plan = &plans[p];
                            in_flight = in_flight.saturating_sub(plan.chunk_bytes());
                            let (bytes, mask) = done.map_err(|err| {
                                corrupt(&self.path, &plan.key, format!("compressing: {err}"))
                            })?;
                            if let std::collections::hash_map::Entry::Vacant(v) = open.entry(p) {
                                v.insert((self.create_dataset(inner, plan)?, 0));
                            }
                            let Some((dset, count)) = open.get_mut(&p) else {
                                return Err(corrupt(&self.path, &plan.key, "lost dataset"));
                            };
                            self.write_chunk(dset, plan, c, &bytes, mask)?;
                            *count += 1;
                            // Small buffers are not worth keeping.
                            if bytes.capacity() >= 64 << 10 {
                                buffers
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(bytes);
                            }
                            if *count == plan.n_chunks() {
                                if let Some((dset, _)) = open.remove(&p) {
                                    written.push((p, dset));
                                }
                            }
                        }
                    }
                }
            })();
            drop(jobs);
            let joined = spawner.join().map_err(|_| stopped());
            result?;
            joined
        })
    }
}
