//! The thread pool of the engine's hot loops (packed matmuls, decode
//! attention), built to degrade gracefully on a busy machine.
//!
//! candle's barrier pool makes every op wait until each worker has run its
//! part. When another process holds a core, a descheduled worker holds up the
//! caller for a whole scheduler slice on every op, and decode falls from
//! 170 to 9 tok/s on two busy cores. Here:
//!
//! - work is claimed from a shared cursor, and the caller waits only for the
//!   workers that joined the job before it ran out of work: a worker that
//!   wakes late finds the job closed and goes back to sleep;
//! - idle workers spin briefly, then park;
//! - the number of threads a job may use follows the CPU time other
//!   processes take (read from `/proc/stat` a few times a second): with a
//!   core's worth of other work on a 2-core machine the loops run serially,
//!   which is as fast as decode gets on one core.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// Busy-wait iterations of an idle worker before it parks: long enough to
/// bridge the gaps between the ops of one token, short enough not to burn a
/// core between requests.
const WORKER_SPINS: u32 = 20_000;
/// Busy-wait iterations of the caller before it starts yielding while the
/// last workers finish their chunks.
const CALLER_SPINS: u32 = 2_000;
/// How often the share of the CPU taken by other processes is re-read.
const LOAD_INTERVAL: Duration = Duration::from_millis(250);

static MAX_THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

thread_local! {
    static IN_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Caps the threads the engine's loops use (`engine.threads`; 0 = one per
/// core). Takes effect on the next parallel loop.
pub fn set_max_threads(threads: usize) {
    MAX_THREADS.store(threads, Ordering::Relaxed);
}

/// The threads the engine's loops use on an idle machine.
pub fn max_threads() -> usize {
    pool().cap()
}

/// Runs `task` over `0..items`, in pieces of at least `min_chunk` items, on
/// the calling thread and whichever workers are free to help.
pub(crate) fn for_each_chunk(items: usize, min_chunk: usize, task: impl Fn(Range<usize>) + Sync) {
    let min_chunk = min_chunk.max(1);
    if items <= min_chunk || IN_WORKER.with(Cell::get) {
        task(0..items);
        return;
    }
    let units = items.div_ceil(min_chunk);
    pool().run(units, &|range: Range<usize>| task(range.start * min_chunk..(range.end * min_chunk).min(items)));
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Pool::start(cores.saturating_sub(1))
    })
}

type Task<'a> = &'a (dyn Fn(Range<usize>) + Sync);

/// The job the workers are invited to: written by the caller only while
/// `open` is false and no worker is registered.
struct Job {
    task: Option<Task<'static>>,
    units: usize,
    grab: usize,
    helpers: usize,
}

struct Shared {
    job: UnsafeCell<Job>,
    cursor: AtomicUsize,
    open: AtomicBool,
    /// Workers inside the current job (or checking whether it is open).
    registered: AtomicUsize,
    /// Bumped once per job; idle workers wait for it to change.
    generation: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only by the caller holding `Pool::call`, while
// `open` is false and `registered` is zero; workers read it only after
// registering and seeing `open` set (see `Pool::run` and `worker`).
unsafe impl Sync for Shared {}

struct Pool {
    shared: &'static Shared,
    workers: Vec<Thread>,
    call: Mutex<()>,
    load: Mutex<LoadMonitor>,
}

impl Pool {
    fn start(workers: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            job: UnsafeCell::new(Job { task: None, units: 0, grab: 1, helpers: 0 }),
            cursor: AtomicUsize::new(0),
            open: AtomicBool::new(false),
            registered: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            panic: Mutex::new(None),
        }));
        let workers = (0..workers)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("memlora-engine-{i}"))
                    .spawn(move || worker(shared))
                    .ok()
                    .map(|handle| handle.thread().clone())
            })
            .collect();
        Self { shared, workers, call: Mutex::new(()), load: Mutex::new(LoadMonitor::new()) }
    }

    fn cap(&self) -> usize {
        match MAX_THREADS.load(Ordering::Relaxed) {
            0 => self.workers.len() + 1,
            n => n.min(self.workers.len() + 1),
        }
    }

    /// The cap, less the cores other processes are keeping busy.
    fn threads_now(&self) -> usize {
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        load.threads(self.cap(), self.workers.len() + 1)
    }

    fn run(&self, units: usize, task: Task<'_>) {
        let threads = self.threads_now();
        if threads <= 1 {
            task(0..units);
            return;
        }
        let _call = self.call.lock().unwrap_or_else(|e| e.into_inner());
        let shared = self.shared;
        // SAFETY: no worker is registered and `open` is false (the previous
        // job ended by waiting for both), so nothing reads the job now. The
        // lifetime is erased for the duration of this call only: the job is
        // closed and every registered worker gone before `run` returns.
        unsafe {
            *shared.job.get() = Job {
                task: Some(std::mem::transmute::<Task<'_>, Task<'static>>(task)),
                units,
                grab: units.div_ceil(threads * 8).max(1),
                helpers: threads - 1,
            };
        }
        shared.cursor.store(0, Ordering::Relaxed);
        shared.open.store(true, Ordering::SeqCst);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        for worker in self.workers.iter().take(threads - 1) {
            worker.unpark();
        }
        // SAFETY: the job was just published and stays valid until closed.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { claim_all(shared) }));
        // Close the job, then wait for the workers that joined it. A worker
        // registers before it checks `open`, so (with SeqCst on both sides)
        // either it sees the job closed or this loop sees it registered.
        shared.open.store(false, Ordering::SeqCst);
        let mut spins = 0u32;
        while shared.registered.load(Ordering::SeqCst) != 0 {
            if spins < CALLER_SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // SAFETY: no worker is registered and the job is closed.
        unsafe { (*shared.job.get()).task = None };
        let worker_panic = shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(payload) = outcome {
            std::panic::resume_unwind(payload);
        }
        if let Some(payload) = worker_panic {
            std::panic::resume_unwind(payload);
        }
    }
}

/// Runs pieces of the open job until its cursor runs out.
///
/// # Safety
/// The job must be open, and stay valid until the caller has closed it and
/// waited for every registered worker.
unsafe fn claim_all(shared: &Shared) {
    let job = &*shared.job.get();
    let Some(task) = job.task else { return };
    loop {
        let start = shared.cursor.fetch_add(job.grab, Ordering::Relaxed);
        if start >= job.units {
            return;
        }
        task(start..job.units.min(start + job.grab));
    }
}

fn worker(shared: &'static Shared) {
    IN_WORKER.with(|w| w.set(true));
    let mut seen = shared.generation.load(Ordering::SeqCst);
    loop {
        let mut spins = 0u32;
        loop {
            let generation = shared.generation.load(Ordering::SeqCst);
            if generation != seen {
                seen = generation;
                break;
            }
            if spins < WORKER_SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                // An unpark before this park makes it return at once.
                std::thread::park();
                spins = 0;
            }
        }
        let index = shared.registered.fetch_add(1, Ordering::SeqCst);
        if shared.open.load(Ordering::SeqCst) {
            // SAFETY: registered while the job is open, so the caller waits
            // for this worker before it closes the job's lifetime.
            let helpers = unsafe { (*shared.job.get()).helpers };
            if index < helpers {
                if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { claim_all(shared) })) {
                    let mut slot = shared.panic.lock().unwrap_or_else(|e| e.into_inner());
                    slot.get_or_insert(payload);
                }
            }
        }
        shared.registered.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tracks how many cores other processes keep busy, from the machine's CPU
/// time (`/proc/stat`) less this process's own (`/proc/self/stat`).
struct LoadMonitor {
    last: Option<(Instant, u64, u64)>,
    others: f64,
}

impl LoadMonitor {
    fn new() -> Self {
        Self { last: None, others: 0.0 }
    }

    fn threads(&mut self, cap: usize, cores: usize) -> usize {
        let now = Instant::now();
        let due = self.last.is_none_or(|(at, _, _)| now.duration_since(at) >= LOAD_INTERVAL);
        if due {
            if let Some((machine, own)) = cpu_ticks() {
                if let Some((at, last_machine, last_own)) = self.last {
                    let seconds = now.duration_since(at).as_secs_f64();
                    let others = machine.saturating_sub(last_machine).saturating_sub(own.saturating_sub(last_own));
                    self.others = others as f64 / ticks_per_second() / seconds;
                }
                self.last = Some((now, machine, own));
            }
        }
        threads_for(cap, cores, self.others)
    }
}

/// Threads to use when other processes keep `others` of `cores` busy: the
/// cores left to this process, rounded, between 1 and `cap`.
fn threads_for(cap: usize, cores: usize, others: f64) -> usize {
    let free = (cores as f64 - others + 0.5).floor();
    (free.max(1.0) as usize).min(cap.max(1))
}

/// Busy ticks of the whole machine and ticks used by this process.
#[cfg(target_os = "linux")]
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …; idle and iowait are not busy.
    let machine = fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields are counted after its ')'.
    let after = own.rsplit_once(')')?.1;
    let mut rest = after.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((machine, utime + stime))
}

#[cfg(not(target_os = "linux"))]
fn cpu_ticks() -> Option<(u64, u64)> {
    None
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_item_is_visited_exactly_once() {
        for items in [0, 1, 7, 16, 17, 1000, 4099] {
            let visits: Vec<AtomicU64> = (0..items).map(|_| AtomicU64::new(0)).collect();
            for_each_chunk(items, 4, |range| {
                for i in range {
                    visits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(visits.iter().all(|v| v.load(Ordering::Relaxed) == 1), "{items} items");
        }
    }

    #[test]
    fn concurrent_callers_each_get_their_own_results() {
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        let total = AtomicU64::new(0);
                        for _ in 0..200 {
                            for_each_chunk(512, 8, |range| {
                                total.fetch_add(range.map(|i| i as u64 * (t + 1)).sum(), Ordering::Relaxed);
                            });
                        }
                        total.load(Ordering::Relaxed)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let one_pass: u64 = (0..512u64).sum();
        for (t, sum) in sums.iter().enumerate() {
            assert_eq!(*sum, one_pass * 200 * (t as u64 + 1));
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_keeps_working() {
        let caught = std::panic::catch_unwind(|| {
            for_each_chunk(1000, 1, |range| {
                if range.contains(&999) {
                    panic!("chunk failed");
                }
            })
        });
        assert!(caught.is_err());
        let count = AtomicU64::new(0);
        for_each_chunk(1000, 1, |range| {
            count.fetch_add(range.len() as u64, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn threads_follow_the_cores_left_by_other_processes() {
        assert_eq!(threads_for(2, 2, 0.0), 2);
        assert_eq!(threads_for(2, 2, 0.3), 2);
        assert_eq!(threads_for(2, 2, 1.0), 1);
        assert_eq!(threads_for(2, 2, 2.0), 1);
        assert_eq!(threads_for(8, 8, 3.0), 5);
        assert_eq!(threads_for(4, 8, 0.0), 4);
        assert_eq!(threads_for(0, 8, 0.0), 1);
    }

    #[test]
    fn cpu_ticks_are_read_on_linux() {
        if cfg!(target_os = "linux") {
            let (machine, own) = cpu_ticks().expect("/proc/stat and /proc/self/stat");
            assert!(machine >= own, "machine {machine} < own {own}");
        }
    }
}
