//! Collective communication among the ranks of a data-parallel run: the [`Collective`] trait
//! (all-reduce sum, all-gather with per-rank counts), [`InProcess`] (ranks as threads, for the
//! tests and for checking the data-parallel logic on a CPU) and, behind the `nccl` feature,
//! `nccl::Nccl` (one process per GPU). What the trainer exchanges through them is in
//! [`super::parallel`].

use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Collective communication among the ranks of a group.
///
/// Every rank must call the same collectives in the same order with matching arguments (as
/// with MPI or NCCL). An error may leave the group unusable; implementations say which.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, written back into `buf` on every rank. Every
    /// rank passes a buffer of the same length.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Concatenation of every rank's `local` in rank order into `out`. Variable sizes:
    /// `counts[r]` floats come from rank `r`, every rank passes the same `counts`,
    /// `local.len() == counts[rank]` and `out.len() == Σ counts`.
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()>;
    /// The NCCL communicator behind this group, when there is one: a trainer whose gradients
    /// live on the GPU sums them there, in place ([`nccl::Nccl::all_reduce_device`]), instead
    /// of through [`Collective::all_reduce_sum`]'s host buffers.
    #[cfg(feature = "nccl")]
    fn nccl(&self) -> Option<&nccl::Nccl> {
        None
    }
}

fn check_gather(
    rank: usize,
    world: usize,
    local: &[f32],
    counts: &[usize],
    out: &[f32],
) -> Result<()> {
    if counts.len() != world
        || local.len() != counts[rank]
        || out.len() != counts.iter().sum::<usize>()
    {
        return Err(Error::InvalidArgument(format!(
            "all-gather on rank {rank}: {} local floats, counts {counts:?}, {} output floats",
            local.len(),
            out.len()
        )));
    }
    Ok(())
}

/// How long a rank waits for the others before [`InProcess`] gives up on the group.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Ranks as threads of one process, exchanging through shared memory.
///
/// Deterministic: the sum is computed once, by the last rank to arrive, adding the ranks'
/// buffers in rank order, and every rank copies that one result, so all ranks get bitwise the
/// same values whatever the thread timing. Any error (mismatched calls, a rank waiting past
/// the timeout, a rank's handle dropped) breaks the group: the pending and every later call on
/// every rank fails instead of hanging.
pub struct InProcess {
    rank: usize,
    group: Arc<Group>,
}

struct Group {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    turn: Condvar,
}

type Outcome = std::result::Result<Vec<f32>, String>;

struct State {
    /// Completed collectives; a waiting rank knows its call is done when this moves on.
    round: u64,
    arrived: usize,
    slots: Vec<Option<Offer>>,
    /// The last completed call's result. It stays until every rank has arrived at the next
    /// call, hence until every rank has read it.
    outcome: Option<Arc<Outcome>>,
    broken: Option<String>,
}

struct Offer {
    op: Op,
    data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Sum,
    Gather(Vec<usize>),
}

impl InProcess {
    /// `world` connected ranks (one per thread), waiting at most [`DEFAULT_TIMEOUT`].
    pub fn group(world: usize) -> Vec<InProcess> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// As [`InProcess::group`], waiting at most `timeout` for the other ranks at each call.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<InProcess> {
        let group = Arc::new(Group {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                arrived: 0,
                slots: (0..world).map(|_| None).collect(),
                outcome: None,
                broken: None,
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.group
            .state
            .lock()
            .map_err(|_| collective_err("a rank panicked inside a collective".into()))
    }

    fn break_group(&self, why: String) -> Error {
        if let Ok(mut st) = self.lock() {
            st.broken.get_or_insert_with(|| why.clone());
        }
        self.group.turn.notify_all();
        collective_err(why)
    }

    /// Offers `data`, waits for every rank, and returns the combined result.
    fn exchange(&self, op: Op, data: Vec<f32>) -> Result<Arc<Outcome>> {
        let g = &*self.group;
        let mut st = self.lock()?;
        if let Some(why) = &st.broken {
            return Err(collective_err(why.clone()));
        }
        let round = st.round;
        st.slots[self.rank] = Some(Offer { op, data });
        st.arrived += 1;
        if st.arrived == g.world {
            let outcome = combine(&mut st.slots);
            if let Err(why) = &outcome {
                st.broken = Some(why.clone());
            }
            st.outcome = Some(Arc::new(outcome));
            st.arrived = 0;
            st.round += 1;
            g.turn.notify_all();
        } else {
            let deadline = Instant::now() + g.timeout;
            // The round check comes first: a call completed just before a rank left is valid.
            while st.round == round {
                if let Some(why) = &st.broken {
                    return Err(collective_err(why.clone()));
                }
                let now = Instant::now();
                if now >= deadline {
                    let why = format!(
                        "rank {} waited {:?} for the other ranks of the group",
                        self.rank, g.timeout
                    );
                    st.broken = Some(why.clone());
                    g.turn.notify_all();
                    return Err(collective_err(why));
                }
                st = g
                    .turn
                    .wait_timeout(st, deadline - now)
                    .map_err(|_| collective_err("a rank panicked inside a collective".into()))?
                    .0;
            }
        }
        st.outcome
            .clone()
            .ok_or_else(|| collective_err("collective finished without a result".into()))
    }

    /// Runs one collective and copies its result into `dst` (outside the lock).
    fn run(&self, op: Op, data: Vec<f32>, dst: &mut [f32]) -> Result<()> {
        match &*self.exchange(op, data)? {
            Ok(v) if v.len() == dst.len() => {
                dst.copy_from_slice(v);
                Ok(())
            }
            Ok(v) => Err(collective_err(format!(
                "rank {} expected {} floats, the collective gave {}",
                self.rank,
                dst.len(),
                v.len()
            ))),
            Err(why) => Err(collective_err(why.clone())),
        }
    }
}

/// Combines the offers of one call, in rank order.
fn combine(slots: &mut [Option<Offer>]) -> Outcome {
    let offers: Vec<Offer> = slots
        .iter_mut()
        .map(Option::take)
        .collect::<Option<_>>()
        .ok_or("a rank's contribution is missing")?;
    let ops: Vec<&Op> = offers.iter().map(|o| &o.op).collect();
    if ops.iter().any(|&op| op != ops[0]) {
        return Err(format!("ranks called different collectives: {ops:?}"));
    }
    match &offers[0].op {
        Op::Sum => {
            let lens: Vec<usize> = offers.iter().map(|o| o.data.len()).collect();
            if lens.iter().any(|&n| n != lens[0]) {
                return Err(format!("all-reduce buffers differ in length: {lens:?}"));
            }
            let mut it = offers.into_iter();
            let mut acc = it.next().map(|o| o.data).unwrap_or_default();
            for o in it {
                for (a, v) in acc.iter_mut().zip(&o.data) {
                    *a += v;
                }
            }
            Ok(acc)
        }
        Op::Gather(counts) => {
            let mut out = Vec::with_capacity(counts.iter().sum());
            for (r, o) in offers.iter().enumerate() {
                if o.data.len() != counts[r] {
                    return Err(format!(
                        "all-gather: rank {r} sent {} floats, counts say {}",
                        o.data.len(),
                        counts[r]
                    ));
                }
                out.extend_from_slice(&o.data);
            }
            Ok(out)
        }
    }
}

fn collective_err(why: String) -> Error {
    Error::InvalidArgument(format!("collective failed: {why}"))
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.run(Op::Sum, buf.to_vec(), buf)
    }
    fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
        // A rank that cannot take part must not leave the others waiting.
        if let Err(e) = check_gather(self.rank, self.group.world, local, counts, out) {
            return Err(self.break_group(e.to_string()));
        }
        self.run(Op::Gather(counts.to_vec()), local.to_vec(), out)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Ranks still waiting (or arriving later) must learn that this one is gone.
        let mut st = match self.group.state.lock() {
            Ok(st) => st,
            Err(poisoned) => poisoned.into_inner(),
        };
        st.broken
            .get_or_insert_with(|| format!("rank {} left the group", self.rank));
        drop(st);
        self.group.turn.notify_all();
    }
}

/// [`Collective`] over NCCL: one process per GPU.
///
/// **Not yet run on GPUs**: this compiles (`cargo check --features nccl`) but has not been
/// exercised on a multi-GPU machine, so treat it as untested.
///
/// The [`Collective`] calls take host slices and stage them through the device (the trainer's
/// few small exchanges: embeddings, counts). A trainer whose gradients live on the GPU sums
/// them in place with [`Nccl::all_reduce_device`](nccl::Nccl::all_reduce_device) instead, on
/// the communicator's stream, which is a stream of that GPU's context so that it can order
/// itself against the trainer's with events (`device::train_step::GpuTrainStep` overlaps the
/// sums with the backward).
///
/// The unique id is shared through a file: rank 0 writes it atomically (temporary file, then
/// rename) and the other ranks poll for it.
/// The path must be fresh for each launch (or deleted by the launcher before the ranks start):
/// a stale file from an earlier run with the same world size would be read as valid.
///
/// NCCL documents no summation order: its ring and tree algorithms give every rank the same
/// reduced values in practice, but neither the order nor the equality is part of its API, so
/// results may differ in the last bits from [`InProcess`].
#[cfg(feature = "nccl")]
pub mod nccl {
    use super::{check_gather, Collective};
    use crate::error::{Error, Result};
    use cudarc::driver::{CudaSlice, CudaStream, DriverError};
    use cudarc::nccl::result::NcclError;
    use cudarc::nccl::{Comm, Id, ReduceOp};
    use std::ffi::c_char;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const MAGIC: &[u8; 8] = b"RRRANCCL";
    const ID_BYTES: usize = 128;

    pub struct Nccl {
        /// NCCL communicators are not thread-safe: calls are serialised.
        comm: Mutex<Comm>,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
    }

    // SAFETY: `Comm` is `!Send`/`!Sync` only because it holds NCCL's raw communicator pointer.
    // NCCL allows a communicator to be used from any thread as long as calls on it are not
    // concurrent, which the mutex guarantees; the stream is cudarc's own thread-safe handle and
    // every call binds the context to the calling thread first.
    unsafe impl Send for Nccl {}
    unsafe impl Sync for Nccl {}

    fn cuda(what: &'static str) -> impl Fn(DriverError) -> Error {
        move |e| Error::Cuda(format!("{what}: {e:?}"))
    }

    fn nccl(what: &'static str) -> impl Fn(NcclError) -> Error {
        move |e| Error::Cuda(format!("NCCL {what}: {e:?}"))
    }

    impl Nccl {
        /// Joins a group of `world` processes as `rank`, communicating on `stream` (a stream
        /// of this rank's GPU; `device::Gpu::new_stream`). Rank 0 creates the unique id and
        /// writes it to `id_file`; the others wait up to `timeout` for it. Then NCCL's own
        /// initialisation blocks until every rank has joined (no timeout).
        pub fn join(
            stream: Arc<CudaStream>,
            rank: usize,
            world: usize,
            id_file: &Path,
            timeout: Duration,
        ) -> Result<Nccl> {
            if rank >= world || world > i32::MAX as usize {
                return Err(Error::InvalidArgument(format!(
                    "rank {rank} of a group of {world}"
                )));
            }
            // SAFETY: this only tries to dlopen the library; cudarc panics on first use of a
            // missing one, so check before any call. (The stream proves libcuda is present.)
            if !unsafe { cudarc::nccl::sys::is_culib_present() } {
                // cudarc looks for libnccl.so (and .so.1, .so.9 to .so.13); NCCL's packages
                // install libnccl.so.2 with no such link
                return Err(Error::CudaUnavailable(
                    "the NCCL library was not found under the names cudarc loads (libnccl.so, \
                     libnccl.so.1, .so.9 to .so.13); NCCL installs libnccl.so.2: link \
                     libnccl.so to it in a folder on LD_LIBRARY_PATH"
                        .into(),
                ));
            }
            let id = if rank == 0 {
                let id = Id::new().map_err(nccl("creating the unique id"))?;
                write_id(id_file, &id, world)?;
                id
            } else {
                read_id(id_file, world, timeout)?
            };
            // NCCL binds the communicator to the current context: make it the stream's
            stream
                .context()
                .bind_to_thread()
                .map_err(cuda("binding the context"))?;
            let comm = Comm::from_rank(stream.clone(), rank, world, id)
                .map_err(nccl("joining the group"))?;
            Ok(Nccl {
                comm: Mutex::new(comm),
                stream,
                rank,
                world,
            })
        }

        fn lock(&self) -> Result<std::sync::MutexGuard<'_, Comm>> {
            self.comm
                .lock()
                .map_err(|_| Error::Cuda("NCCL communicator poisoned by a panic".into()))
        }

        /// The stream the communicator's collectives run on.
        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// Queues the in-place sum over the ranks of each of `bufs`, in order, on
        /// [`Nccl::stream`], and returns without waiting. The caller orders it: the stream
        /// must wait for the writes of `bufs` before (an event recorded where they were
        /// written), and readers must wait for this stream after. The buffers must belong to
        /// this stream's device; every rank passes buffers of the same lengths in the same order.
        pub fn all_reduce_device(&self, bufs: &mut [CudaSlice<f32>]) -> Result<()> {
            let comm = self.lock()?;
            self.stream
                .context()
                .bind_to_thread()
                .map_err(cuda("binding the context"))?;
            for b in bufs.iter_mut().filter(|b| !b.is_empty()) {
                comm.all_reduce_in_place(b, &ReduceOp::Sum)
                    .map_err(nccl("all-reduce of a gradient"))?;
            }
            Ok(())
        }
    }

    fn write_id(path: &Path, id: &Id, world: usize) -> Result<()> {
        let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + ID_BYTES);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(world as u32).to_le_bytes());
        bytes.extend(id.internal().iter().map(|&c| c as u8));
        crate::util::atomic_write(path, |w| {
            std::io::Write::write_all(w, &bytes).map_err(|e| Error::io(path, e))
        })
    }

    fn read_id(path: &Path, world: usize, timeout: Duration) -> Result<Id> {
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::read(path) {
                Ok(bytes) => return parse_id(path, &bytes, world),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            if Instant::now() >= deadline {
                return Err(Error::io(
                    PathBuf::from(path),
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("rank 0 did not write the NCCL id within {timeout:?}"),
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn parse_id(path: &Path, bytes: &[u8], world: usize) -> Result<Id> {
        let header = MAGIC.len() + 4;
        if bytes.len() != header + ID_BYTES || &bytes[..MAGIC.len()] != MAGIC {
            return Err(Error::format(path, "not an rrra NCCL id file"));
        }
        let file_world = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if file_world as usize != world {
            return Err(Error::mismatch(
                path,
                format!("NCCL id written for {file_world} ranks, this group has {world}"),
            ));
        }
        let mut internal = [0 as c_char; ID_BYTES];
        for (o, &b) in internal.iter_mut().zip(&bytes[header..]) {
            *o = b as c_char;
        }
        Ok(Id::uninit(internal))
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            // Every rank passes the same length, so all skip an empty call together.
            if buf.is_empty() {
                return Ok(());
            }
            let comm = self.lock()?;
            let s = &self.stream;
            s.context()
                .bind_to_thread()
                .map_err(cuda("binding the context"))?;
            let mut dev = s.clone_htod(&*buf).map_err(cuda("copying to the device"))?;
            comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum)
                .map_err(nccl("all-reduce"))?;
            s.memcpy_dtoh(&dev, buf)
                .map_err(cuda("copying to the host"))?;
            s.synchronize().map_err(cuda("synchronizing"))
        }
        fn nccl(&self) -> Option<&Nccl> {
            Some(self)
        }
        fn all_gather(&self, local: &[f32], counts: &[usize], out: &mut [f32]) -> Result<()> {
            check_gather(self.rank, self.world, local, counts, out)?;
            // NCCL gathers equal sizes: pad every rank's part to the largest, then compact.
            let max = counts.iter().copied().max().unwrap_or(0);
            if max == 0 {
                return Ok(());
            }
            let mut padded = vec![0.0f32; max];
            padded[..local.len()].copy_from_slice(local);
            let comm = self.lock()?;
            let s = &self.stream;
            s.context()
                .bind_to_thread()
                .map_err(cuda("binding the context"))?;
            let send = s
                .clone_htod(&padded)
                .map_err(cuda("copying to the device"))?;
            let mut recv = s
                .alloc_zeros::<f32>(max * self.world)
                .map_err(cuda("allocating"))?;
            comm.all_gather(&send, &mut recv)
                .map_err(nccl("all-gather"))?;
            let all = s.clone_dtoh(&recv).map_err(cuda("copying to the host"))?;
            s.synchronize().map_err(cuda("synchronizing"))?;
            let mut at = 0;
            for (r, &c) in counts.iter().enumerate() {
                out[at..at + c].copy_from_slice(&all[r * max..r * max + c]);
                at += c;
            }
            Ok(())
        }
    }
}
