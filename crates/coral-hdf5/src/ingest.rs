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
//! The threads finish in any order, but the writer takes their results in an order fixed
//! before it starts (hashes in the order a model of the pipeline finishes them, [`hash_turns`];
//! chunks in queue order; each stream on its own), holding early finishers until their turn.
//! Until the end of the batch only chunk writes (and the creation of a dataset at its first
//! chunk) change the file, in queue order, which depends only on the batch and the codec;
//! datasets without chunks, attributes and links follow in plan order. So the same batch gives
//! the same file, byte for byte, on every run.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};

use coral_core::{ContentHash, WeightTensor};
use coral_store_api::{Result, StoreError, Stored};

use crate::chunk::ChunkError;
use crate::h5::{self, Hid};
use crate::options::Compression;
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
        let (tx, rx) = mpsc::channel::<Event>();
        // Buffers of written chunks are reused for the next ones: no fresh memory per chunk.
        let buffers: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
        let hash = |i: usize| hash_item(&items[i], algorithm);
        let (jobs, job_rx) = mpsc::channel::<Job>();
        std::thread::scope(|scope| -> Result<()> {
            // Tasks are spawned from a plain thread of our own, never from this one: waiting for
            // them at the end makes a rayon worker run other rayon work, which on a thread that
            // holds the store (an application storing from rayon's pool) could be another store
            // call waiting for this very store.
            let (tx, hash, buffers) = (tx.clone(), &hash, &buffers);
            let spawner = scope.spawn(move || run_jobs(job_rx, &tx, hash, buffers));
            let mut writer = Writer::new(self, inner, items, keys, sizes, buffers, jobs, rx);
            let result = writer.run();
            // Dropping the writer drops the job channel: the spawner ends once the tasks are done.
            drop(writer);
            let joined = spawner.join().map_err(|_| stopped(self));
            result?;
            joined
        })
    }
}

/// The error when the compression threads stopped before the batch was done.
fn stopped(store: &HDF5Store) -> StoreError {
    corrupt(&store.path, "", "storing: the compression threads stopped")
}

/// The key of `item`, hashed as [`KeyGiven`] says (`algorithm`: the store's).
fn hash_item(
    (w, given): &(&WeightTensor, KeyGiven),
    algorithm: coral_core::HashAlgorithm,
) -> Result<ContentHash> {
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
}

/// What hashing a byte costs in [`hash_turns`]'s model (SHA-256, 1.56 GB/s on one core).
pub(crate) const HASH_COST: u64 = 4;

/// What compressing a byte costs in [`hash_turns`]'s model, beside [`HASH_COST`]. From
/// `perf record` of adds of all-MiniLM-L6-v2: a chunk through zstd's plane encoder (level 5 or
/// less) takes three quarters of the time its hash does; the float codec (140 MB/s) about ten
/// times; gzip and the higher zstd levels as much or more; `none` is a copy. Only the order of
/// the turns rests on these, never what is written.
fn compress_cost(compression: Compression, level: Option<i32>) -> u64 {
    match compression {
        Compression::None => 1,
        Compression::Zstd if level.unwrap_or(1) <= 5 => 3,
        Compression::Zstd => 40,
        Compression::Lzf => 8,
        Compression::Gzip | Compression::Coral => 48,
    }
}

/// The order in which the writer takes hash results, as hash numbers. Taking them in hand-out
/// order would hold every small tensor's compression back until the largest is hashed (on
/// all-MiniLM-L6-v2, a 47 MB embedding: 40 ms with the other cores idle); taking them as they
/// come would make the file depend on timing. So the order comes from a model of the pipeline
/// on `lanes` threads: items of `sizes` (in hand-out order, largest first) are hashed at most
/// `lanes` at a time at [`HASH_COST`] a byte, and a hashed item's chunks of at most
/// `chunk_bytes` join a queue that a free thread takes before its next hash, at `compress_cost`
/// a byte; the turns are the order the model finishes the hashes in. While one thread hashes
/// the embedding, the model has the other hash and compress the small tensors, so the
/// embedding's turn (and its chunks) come once that thread is about as far as it would be.
/// The order depends only on the batch and the codec, so the file does not depend on timing,
/// and equal sizes keep their batch order (a weight's first name is taken first).
pub(crate) fn hash_turns(
    sizes: &[usize],
    lanes: usize,
    chunk_bytes: usize,
    compress_cost: u64,
) -> Vec<u64> {
    let lanes = lanes.max(1);
    // Steps of at least 1 MiB: a model of many GB in 4 KiB chunks takes no more steps than
    // bytes in MiB.
    let chunk = (chunk_bytes as u64).max(1 << 20);
    // When each thread is next free; what each is hashing (finish time, hash number).
    let mut free = vec![0u64; lanes];
    let mut hashing: Vec<(u64, u64)> = Vec::with_capacity(lanes);
    // Compression work queued, in bytes' cost.
    let mut queued: u64 = 0;
    let mut next = 0usize;
    let mut turns = Vec::with_capacity(sizes.len());
    while turns.len() < sizes.len() {
        // The thread free first (the lowest number on a tie) and the hashes done by then.
        let lane = (0..lanes).min_by_key(|&l| (free[l], l)).unwrap_or(0);
        let now = free[lane];
        hashing.sort_unstable();
        while let Some(&(done, seq)) = hashing.first() {
            if done > now {
                break;
            }
            hashing.remove(0);
            turns.push(seq);
            let size = sizes.get(seq as usize).map_or(0, |&s| s as u64);
            queued = queued.saturating_add(size.saturating_mul(compress_cost));
        }
        if queued > 0 {
            // One chunk's compression.
            let step = queued.min(chunk.saturating_mul(compress_cost.max(1)));
            queued -= step;
            free[lane] = now.saturating_add(step.max(1));
        } else if let (true, Some(&size)) = (hashing.len() < lanes, sizes.get(next)) {
            let done = now.saturating_add((size as u64).saturating_mul(HASH_COST));
            hashing.push((done, next as u64));
            free[lane] = done;
            next += 1;
        } else if let Some(&(done, _)) = hashing.iter().min() {
            // Idle until the next hash is done.
            free[lane] = done.max(now.saturating_add(1));
        } else {
            break;
        }
    }
    turns
}

/// The spawner thread: runs each job of `job_rx` on the compression threads until the channel
/// closes, each reporting to `tx`, and returns once every task it spawned is done.
fn run_jobs<H>(
    job_rx: mpsc::Receiver<Job>,
    tx: &mpsc::Sender<Event>,
    hash: &H,
    buffers: &Mutex<Vec<Vec<u8>>>,
) where
    H: Fn(usize) -> Result<ContentHash> + Sync,
{
    in_compression_scope(|rs| {
        for job in job_rx {
            let tx = tx.clone();
            match job {
                Job::Hash(seq, i) => rs.spawn(move |_| hash_job(&tx, hash, seq, i)),
                Job::Chunk(seq, p, c, plan) => {
                    rs.spawn(move |_| chunk_job(&tx, buffers, seq, p, c, &plan))
                }
            }
        }
    })
}

/// Hashes item `i` (the `seq`-th hash) and reports it, a panic as an error.
fn hash_job<H>(tx: &mpsc::Sender<Event>, hash: &H, seq: u64, i: usize)
where
    H: Fn(usize) -> Result<ContentHash>,
{
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| hash(i))).unwrap_or_else(|_| {
        Err(StoreError::backend(
            "hashing",
            std::io::Error::other("a hashing thread panicked"),
        ))
    });
    let _ = tx.send(Event::Hashed(seq, i, r));
}

/// Compresses chunk `c` of `plan` (plan `p`, the `seq`-th chunk) into a reused buffer and
/// reports it, a panic as an error.
fn chunk_job(
    tx: &mpsc::Sender<Event>,
    buffers: &Mutex<Vec<Vec<u8>>>,
    seq: u64,
    p: usize,
    c: usize,
    plan: &Encoded,
) {
    let done = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut buf = take_largest(buffers);
        plan.encode_chunk(c, &mut buf).map(|mask| (buf, mask))
    }))
    .unwrap_or_else(|_| Err(ChunkError("a compression thread panicked".into())));
    // The writer may have stopped on an error: nothing to do then.
    let _ = tx.send(Event::Chunk(seq, p, c, done));
}

/// The writer's side of the event loop: what it handed out, what came back, and what it wrote.
struct Writer<'a, 'w> {
    store: &'a HDF5Store,
    inner: &'a Inner,
    items: &'a [(&'w WeightTensor, KeyGiven)],
    keys: &'a mut [Option<ContentHash>],
    sizes: &'a mut [Option<u64>],
    buffers: &'a Mutex<Vec<Vec<u8>>>,
    jobs: mpsc::Sender<Job>,
    events: mpsc::Receiver<Event>,
    /// Items not yet handed out to hash, largest first.
    to_hash: VecDeque<usize>,
    /// The hash numbers in the order their results are taken ([`hash_turns`]).
    hash_turns: Vec<u64>,
    /// Hash tasks handed out and not yet reported.
    hashing: usize,
    /// Uncompressed bytes of the chunks handed out and not yet written.
    in_flight: usize,
    /// The datasets to write, one per new key, in the order their keys were taken.
    plans: Vec<Arc<Encoded>>,
    /// Bytes written for each plan's chunks.
    plan_bytes: Vec<u64>,
    /// The first item (in batch order) of each plan's key: its metadata is written.
    first: Vec<usize>,
    /// Each key seen: its plan, or None when already stored.
    by_key: HashMap<ContentHash, Option<usize>>,
    /// Chunks to hand out, `(plan, chunk)`, in queue order.
    queue: VecDeque<(usize, usize)>,
    /// Datasets created and not yet complete: their chunks written so far.
    open: HashMap<usize, (Hid, usize)>,
    /// Complete datasets (attributes written), to link at the end.
    written: Vec<(usize, Hid)>,
    /// Plans without chunks (empty tensors, scalars): their datasets come at the end.
    empty: Vec<usize>,
    /// Results waiting for their turn, by number: hashes and chunks count apart.
    hashes_done: BTreeMap<u64, Event>,
    chunks_done: BTreeMap<u64, Event>,
    /// The number of the next hash to hand out, and of the next one to take in its turn.
    next_hash_seq: u64,
    next_hash_turn: u64,
    /// The same for chunks.
    next_chunk_seq: u64,
    next_chunk_turn: u64,
}

impl<'a, 'w> Writer<'a, 'w> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        store: &'a HDF5Store,
        inner: &'a Inner,
        items: &'a [(&'w WeightTensor, KeyGiven)],
        keys: &'a mut [Option<ContentHash>],
        sizes: &'a mut [Option<u64>],
        buffers: &'a Mutex<Vec<Vec<u8>>>,
        jobs: mpsc::Sender<Job>,
        events: mpsc::Receiver<Event>,
    ) -> Self {
        let mut to_hash: Vec<usize> = (0..items.len()).collect();
        to_hash.sort_by_key(|&i| std::cmp::Reverse(items[i].0.nbytes()));
        let handed_out: Vec<usize> = to_hash.iter().map(|&i| items[i].0.nbytes()).collect();
        let cost = compress_cost(store.opts.compression, store.opts.effective_level());
        let hash_turns = hash_turns(&handed_out, HASHES_AHEAD, store.opts.chunk_bytes, cost);
        Writer {
            store,
            inner,
            items,
            keys,
            sizes,
            buffers,
            jobs,
            events,
            to_hash: VecDeque::from(to_hash),
            hash_turns,
            hashing: 0,
            in_flight: 0,
            plans: Vec::new(),
            plan_bytes: Vec::new(),
            first: Vec::new(),
            by_key: HashMap::new(),
            queue: VecDeque::new(),
            open: HashMap::new(),
            written: Vec::new(),
            empty: Vec::new(),
            hashes_done: BTreeMap::new(),
            chunks_done: BTreeMap::new(),
            next_hash_seq: 0,
            next_hash_turn: 0,
            next_chunk_seq: 0,
            next_chunk_turn: 0,
        }
    }

    /// Hands out work and takes results in their turn until the batch is written and linked.
    fn run(&mut self) -> Result<()> {
        loop {
            self.dispatch()?;
            if self.all_written() {
                return self.link_all();
            }
            match self.next_in_turn()? {
                Some(Event::Hashed(_, i, key)) => self.on_hashed(i, key?)?,
                Some(Event::Chunk(_, p, c, done)) => self.on_chunk(p, c, done)?,
                None => {}
            }
        }
    }

    /// Chunks of what is hashed first, then the next tensor to hash: the threads take tasks in
    /// order, so compression never waits behind hashing.
    fn dispatch(&mut self) -> Result<()> {
        while let Some(&(p, c)) = self.queue.front() {
            let plan = &self.plans[p];
            let cost = plan.chunk_bytes();
            if self.in_flight > 0 && self.in_flight + cost > IN_FLIGHT_BYTES {
                break;
            }
            self.queue.pop_front();
            self.in_flight += cost;
            self.jobs
                .send(Job::Chunk(self.next_chunk_seq, p, c, Arc::clone(plan)))
                .map_err(|_| stopped(self.store))?;
            self.next_chunk_seq += 1;
        }
        while self.hashing < HASHES_AHEAD {
            let Some(i) = self.to_hash.pop_front() else {
                break;
            };
            self.jobs
                .send(Job::Hash(self.next_hash_seq, i))
                .map_err(|_| stopped(self.store))?;
            self.next_hash_seq += 1;
            self.hashing += 1;
        }
        Ok(())
    }

    /// True when every key is hashed and every chunk written.
    fn all_written(&self) -> bool {
        let all_hashed = self.next_hash_turn == self.next_hash_seq && self.to_hash.is_empty();
        all_hashed && self.in_flight == 0 && self.queue.is_empty()
    }

    /// The end of the batch. Every key is right, every chunk written (and each dataset's
    /// attributes, `hash` last, with its last chunk): the datasets without chunks, then the
    /// links, in plan order; only now does any of it get a name, so a batch that fails
    /// anywhere before this links nothing.
    fn link_all(&mut self) -> Result<()> {
        let store = self.store;
        for p in std::mem::take(&mut self.empty) {
            let dset = store.create_dataset(self.inner, &self.plans[p])?;
            self.write_attrs(p, &dset)?;
            self.written.push((p, dset));
        }
        for (p, &i) in self.first.iter().enumerate() {
            self.sizes[i] = Some(self.plan_bytes[p]);
        }
        self.written.sort_by_key(|(p, _)| *p);
        for (p, dset) in self.written.drain(..) {
            h5::link_object(dset.id(), self.inner.weights.id(), &self.plans[p].key)
                .map_err(|e| store.err(e))?;
        }
        Ok(())
    }

    /// The next result in its turn: hashes in the order handed out, chunks in queue order
    /// (either may go first; only chunk writes change the file before the end, and they keep
    /// their order). `None` when the one that came in must wait for its turn.
    fn next_in_turn(&mut self) -> Result<Option<Event>> {
        let turn = usize::try_from(self.next_hash_turn).ok();
        if let Some(&seq) = turn.and_then(|t| self.hash_turns.get(t)) {
            if let Some(e) = self.hashes_done.remove(&seq) {
                self.next_hash_turn += 1;
                return Ok(Some(e));
            }
        }
        if let Some(e) = self.chunks_done.remove(&self.next_chunk_turn) {
            self.next_chunk_turn += 1;
            return Ok(Some(e));
        }
        match self.events.recv().map_err(|_| stopped(self.store))? {
            e @ Event::Hashed(seq, ..) => {
                // The thread is free again (the top of the loop hands it the next tensor),
                // though the result waits its turn.
                self.hashing -= 1;
                self.hashes_done.insert(seq, e);
            }
            e @ Event::Chunk(seq, ..) => {
                self.chunks_done.insert(seq, e);
            }
        }
        Ok(None)
    }

    /// Item `i` hashed to `key`: a key seen before or already stored needs nothing more; a new
    /// one gets a plan and its chunks join the queue.
    fn on_hashed(&mut self, i: usize, key: ContentHash) -> Result<()> {
        let store = self.store;
        self.keys[i] = Some(key);
        if let Some(plan) = self.by_key.get(&key) {
            if let Some(p) = *plan {
                self.first[p] = self.first[p].min(i);
            }
            return Ok(());
        }
        let hex = key.to_hex();
        let weights = self.inner.weights.id();
        if store.weight_present(self.inner, &hex)? {
            self.by_key.insert(key, None);
            return Ok(());
        }
        // A leftover of an interrupted write (no `hash` attribute) is replaced.
        if h5::link_exists(weights, &hex).map_err(|e| store.err(e))? {
            store.unlink(weights, &hex)?;
        }
        let w = self.items[i].0;
        let plan = store.encode(
            hex,
            w.dtype(),
            w.shape(),
            w.data(),
            w.release_hint().cloned(),
        )?;
        let p = self.plans.len();
        let n = plan.n_chunks();
        self.plans.push(Arc::new(plan));
        self.plan_bytes.push(0);
        self.first.push(i);
        self.by_key.insert(key, Some(p));
        if n == 0 {
            self.empty.push(p);
        } else {
            self.queue.extend((0..n).map(|c| (p, c)));
        }
        Ok(())
    }

    /// Chunk `c` of plan `p` compressed: written into its dataset (created at its first chunk);
    /// the dataset's attributes follow its last chunk.
    fn on_chunk(
        &mut self,
        p: usize,
        c: usize,
        done: std::result::Result<(Vec<u8>, u32), ChunkError>,
    ) -> Result<()> {
        let store = self.store;
        let plan = Arc::clone(&self.plans[p]);
        self.in_flight = self.in_flight.saturating_sub(plan.chunk_bytes());
        let (bytes, mask) =
            done.map_err(|err| corrupt(&store.path, &plan.key, format!("compressing: {err}")))?;
        if let std::collections::hash_map::Entry::Vacant(v) = self.open.entry(p) {
            v.insert((store.create_dataset(self.inner, &plan)?, 0));
        }
        let Some((dset, count)) = self.open.get_mut(&p) else {
            return Err(corrupt(&store.path, &plan.key, "lost dataset"));
        };
        store.write_chunk(dset, &plan, c, &bytes, mask)?;
        *count += 1;
        let complete = *count == plan.n_chunks();
        self.plan_bytes[p] = self.plan_bytes[p].saturating_add(bytes.len() as u64);
        // Small buffers are not worth keeping.
        if bytes.capacity() >= 64 << 10 {
            self.buffers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(bytes);
        }
        if complete {
            if let Some((dset, _)) = self.open.remove(&p) {
                // Its first name is known: equal content has equal size, and hashes are
                // taken by size, then batch order.
                self.write_attrs(p, &dset)?;
                self.written.push((p, dset));
            }
        }
        Ok(())
    }

    /// Writes the attributes of plan `p`'s dataset, from the metadata of its first item.
    fn write_attrs(&self, p: usize, dset: &Hid) -> Result<()> {
        HDF5Store::weight_attrs(
            self.items[self.first[p]].0.metadata(),
            &self.plans[p].key,
            dset.id(),
        )
        .map_err(|e| self.store.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::{hash_turns, HASH_COST};

    #[test]
    fn hash_turns_take_the_small_before_the_large_one_and_keep_equal_sizes_in_order() {
        // Without compression the model only hashes. One lane: hand-out order.
        assert_eq!(hash_turns(&[5, 3, 3], 1, 4, 0), vec![0, 1, 2]);
        // Two lanes: the large item finishes after the smaller ones beside it.
        assert_eq!(
            hash_turns(&[47, 10, 10, 10, 5], 2, 4, 0),
            vec![1, 2, 3, 4, 0]
        );
        // Equal sizes keep their order, whatever lane they ran in.
        assert_eq!(hash_turns(&[4, 4, 4, 4], 2, 4, 0), vec![0, 1, 2, 3]);
        assert_eq!(hash_turns(&[4, 4, 4, 4], 2, 4, HASH_COST), vec![0, 1, 2, 3]);
        assert_eq!(hash_turns(&[], 2, 4, HASH_COST), Vec::<u64>::new());
        // Every number once, whatever the costs.
        let sizes: Vec<usize> = (0..100).map(|i| (i * 7919) % 97).collect();
        let mut sorted = sizes.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        for (lanes, chunk, cost) in [(3, 4, 0), (2, 1, 3), (2, 10, 48), (1, 0, 1), (4, 7, 40)] {
            let mut t = hash_turns(&sorted, lanes, chunk, cost);
            t.sort_unstable();
            assert_eq!(t, (0..100).collect::<Vec<u64>>(), "{lanes} {chunk} {cost}");
        }
        // Zero lanes act as one.
        assert_eq!(hash_turns(&[2, 1], 0, 4, 0), vec![0, 1]);
    }

    #[test]
    fn compression_brings_the_large_items_turn_forward() {
        // While one thread hashes the large item, the other hashes the small ones and
        // compresses them too: it is through two of them, not four, when the large one is done.
        // (MB: the model's steps are a chunk, 1 MiB at least.)
        let sizes = [47 << 20, 10 << 20, 10 << 20, 10 << 20, 5 << 20];
        assert_eq!(
            hash_turns(&sizes, 2, 4 << 20, HASH_COST),
            vec![1, 2, 0, 3, 4]
        );
        // The slower the codec, the sooner.
        assert_eq!(hash_turns(&sizes, 2, 4 << 20, 48), vec![1, 0, 2, 3, 4]);
        // Chunks under 1 MiB are modelled as 1 MiB steps: no more steps than MiB.
        assert_eq!(hash_turns(&sizes, 2, 4096, HASH_COST), vec![1, 2, 0, 3, 4]);
        // Huge sizes and costs saturate rather than overflow.
        let t = hash_turns(&[usize::MAX, usize::MAX / 2, 1], 2, usize::MAX, u64::MAX);
        assert_eq!(t.len(), 3);
    }
}
