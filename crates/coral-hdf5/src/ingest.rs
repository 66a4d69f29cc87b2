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
//! The threads finish in any order, but the writer takes their results in the order it handed
//! out the work (hashes in hashing order, chunks in queue order, each stream on its own),
//! holding early finishers until their turn. Until the end of the batch only chunk writes (and
//! the creation of a dataset at its first chunk) change the file, in queue order, which
//! depends only on the batch; datasets without chunks, attributes and links follow in plan
//! order. So the same batch gives the same file, byte for byte, on every run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};

use coral_core::{ContentHash, WeightTensor};
use coral_store_api::{Result, StoreError, Stored};

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
    /// Hash item `.1`, the `.0`-th hash handed out.
    Hash(u64, usize),
    /// Compress chunk `.2` of plan `.1`, the `.0`-th chunk handed out.
    Chunk(u64, usize, usize, Arc<Encoded>),
}

/// What the compression threads report to the writer.
enum Event {
    /// Item `.1` (the `.0`-th hash) hashed to `.2`, or failed (a wrong key given, or a panic).
    Hashed(u64, usize, Result<ContentHash>),
    /// Chunk `.2` of plan `.1` (the `.0`-th chunk) compressed, with its filter mask.
    Chunk(
        u64,
        usize,
        usize,
        std::result::Result<(Vec<u8>, u32), ChunkError>,
    ),
}

/// What the caller knows of an item's key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyGiven {
    /// Nothing: hash with the store's algorithm.
    Compute,
    /// A key to check: hash with its algorithm, and refuse another.
    Check(ContentHash),
    /// The key of a [`coral_core::HashedWeight`]: the data was hashed already.
    Known(ContentHash),
}

impl HDF5Store {
    /// Stores `items` and flushes; returns what storing each did, in order.
    pub(crate) fn store_many(&self, items: &[(&WeightTensor, KeyGiven)]) -> Result<Vec<Stored>> {
        let mut keys: Vec<Option<ContentHash>> = vec![None; items.len()];
        let mut sizes: Vec<Option<u64>> = vec![None; items.len()];
        self.with_write(|inner| self.ingest(inner, items, &mut keys, &mut sizes))?;
        self.with_write(|inner| self.flush(inner))?;
        items
            .iter()
            .zip(keys.into_iter().zip(sizes))
            .map(|((w, _), (k, size))| {
                let key = k.ok_or_else(|| {
                    corrupt(&self.path, "", format!("{:?} was not hashed", w.name()))
                })?;
                Ok(Stored {
                    key,
                    new: size.is_some(),
                    stored_bytes: size.unwrap_or(0),
                })
            })
            .collect()
    }

    /// The event loop of [`HDF5Store::store_many`]. Call under the lock. Sets each item's key,
    /// and the stored bytes of the item that wrote each new weight.
    fn ingest(
        &self,
        inner: &Inner,
        items: &[(&WeightTensor, KeyGiven)],
        keys: &mut [Option<ContentHash>],
        sizes: &mut [Option<u64>],
    ) -> Result<()> {
        let algorithm = self.opts.hash_algorithm;
        let mut to_hash: Vec<usize> = (0..items.len()).collect();
        to_hash.sort_by_key(|&i| std::cmp::Reverse(items[i].0.nbytes()));
        let mut to_hash = VecDeque::from(to_hash);
        let (tx, rx) = mpsc::channel::<Event>();
        // Buffers of written chunks are reused for the next ones: no fresh memory per chunk.
        let buffers: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        let hash = |i: usize| -> Result<ContentHash> {
            let (w, given) = &items[i];
            match given {
                KeyGiven::Known(k) => Ok(*k),
                KeyGiven::Compute => Ok(w.compute_hash_with(algorithm)),
                KeyGiven::Check(k) => {
                    let actual = w.compute_hash_with(k.algorithm());
                    if actual == *k {
                        Ok(actual)
                    } else {
                        Err(StoreError::KeyMismatch {
                            name: w.name().to_owned(),
                            key: *k,
                            actual,
                        })
                    }
                }
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
            // Bytes written for each plan's chunks.
            let mut plan_bytes: Vec<u64> = Vec::new();
            // The first item (in batch order) of each plan's key: its metadata is written.
            let mut first: Vec<usize> = Vec::new();
            // Each key seen: its plan, or None when already stored.
            let mut by_key: HashMap<ContentHash, Option<usize>> = HashMap::new();
            let mut queue: VecDeque<(usize, usize)> = VecDeque::new();
            let mut open: HashMap<usize, (Hid, usize)> = HashMap::new();
            let mut written: Vec<(usize, Hid)> = Vec::new();
            // Plans without chunks (empty tensors, scalars): their datasets come at the end.
            let mut empty: Vec<usize> = Vec::new();
            // Results waiting for their turn, by number: hashes and chunks count apart.
            let mut hashes_done: BTreeMap<u64, Event> = BTreeMap::new();
            let mut chunks_done: BTreeMap<u64, Event> = BTreeMap::new();
            let (mut next_hash_seq, mut next_hash_turn) = (0u64, 0u64);
            let (mut next_chunk_seq, mut next_chunk_turn) = (0u64, 0u64);
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
                        jobs.send(Job::Chunk(next_chunk_seq, p, c, Arc::clone(plan)))
                            .map_err(|_| stopped())?;
                        next_chunk_seq += 1;
                    }
                    while hashing < HASHES_AHEAD {
                        let Some(i) = to_hash.pop_front() else { break };
                        jobs.send(Job::Hash(next_hash_seq, i))
                            .map_err(|_| stopped())?;
                        next_hash_seq += 1;
                        hashing += 1;
                    }
                    let all_hashed = next_hash_turn == next_hash_seq && to_hash.is_empty();
                    if all_hashed && in_flight == 0 && queue.is_empty() {
                        // Every key is right, every chunk written (and each dataset's attributes,
                        // `hash` last, with its last chunk): the datasets without chunks, then
                        // the links, in plan order; only now does any of it get a name, so a
                        // batch that fails anywhere before this links nothing.
                        for p in empty.drain(..) {
                            let dset = self.create_dataset(inner, &plans[p])?;
                            Self::weight_attrs(
                                items[first[p]].0.metadata(),
                                &plans[p].key,
                                dset.id(),
                            )
                            .map_err(|e| self.err(e))?;
                            written.push((p, dset));
                        }
                        for (p, &i) in first.iter().enumerate() {
                            sizes[i] = Some(plan_bytes[p]);
                        }
                        written.sort_by_key(|(p, _)| *p);
                        for (p, dset) in written.drain(..) {
                            h5::link_object(dset.id(), inner.weights.id(), &plans[p].key)
                                .map_err(|e| self.err(e))?;
                        }
                        return Ok(());
                    }
                    // The next result in its turn: hashes in the order handed out, chunks in
                    // queue order (either may go first; only chunk writes change the file
                    // before the end, and they keep their order).
                    let event = if let Some(e) = hashes_done.remove(&next_hash_turn) {
                        next_hash_turn += 1;
                        e
                    } else if let Some(e) = chunks_done.remove(&next_chunk_turn) {
                        next_chunk_turn += 1;
                        e
                    } else {
                        match rx.recv().map_err(|_| {
                            corrupt(&self.path, "", "storing: the compression threads stopped")
                        })? {
                            e @ Event::Hashed(seq, ..) => {
                                // The thread is free again (the top of the loop hands it the
                                // next tensor), though the result waits its turn.
                                hashing -= 1;
                                hashes_done.insert(seq, e);
                            }
                            e @ Event::Chunk(seq, ..) => {
                                chunks_done.insert(seq, e);
                            }
                        }
                        continue;
                    };
                    match event {
                        Event::Hashed(_, i, key) => {
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
                            let w = items[i].0;
                            let plan = self.encode(hex, w.dtype(), w.shape(), w.data())?;
                            let p = plans.len();
                            let n = plan.n_chunks();
                            plans.push(Arc::new(plan));
                            plan_bytes.push(0);
                            first.push(i);
                            by_key.insert(key, Some(p));
                            if n == 0 {
                                empty.push(p);
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
                            plan_bytes[p] = plan_bytes[p].saturating_add(bytes.len() as u64);
                            // Small buffers are not worth keeping.
                            if bytes.capacity() >= 64 << 10 {
                                buffers
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(bytes);
                            }
                            if *count == plan.n_chunks() {
                                if let Some((dset, _)) = open.remove(&p) {
                                    // Its first name is known: equal content has equal size,
                                    // and hashes are taken by size, then batch order.
                                    Self::weight_attrs(
                                        items[first[p]].0.metadata(),
                                        &plan.key,
                                        dset.id(),
                                    )
                                    .map_err(|e| self.err(e))?;
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
