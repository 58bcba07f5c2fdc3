//! The worker's compute threads: a fixed set of threads, optionally pinned to cores, that run
//! one job at a time split into tasks.
//!
//! A decode step of a small model is a few hundred short ops (a matmul of a 576-wide layer takes
//! tens of microseconds), so the cost that matters is the hand-off between ops. Threads wait for
//! the next job by spinning on a generation counter for a bounded time, then yield, then park;
//! the caller runs tasks too and returns when every task has finished, which is the barrier
//! between ops. Tasks are claimed from an atomic counter, so uneven tasks balance themselves.
//!
//! Kernels reach the pool through [`for_each`] and [`threads`], which use the pool installed on
//! the calling thread ([`ThreadPool::install`]) and run serially when there is none.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle thread spins before it starts yielding, and yields before it parks. A
/// yield costs well under a microsecond when no other thread wants the core, and lets a
/// preempted thread of the same job run when the cores are oversubscribed.
const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_millis(2);
/// How long the caller spins for the last tasks of a job before it yields.
const JOIN_SPIN: Duration = Duration::from_micros(10);

/// Keeps a hot atomic on its own cache line.
#[repr(align(64))]
struct Padded<T>(T);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; idle threads wait for it to change.
    generation: Padded<AtomicU64>,
    /// Next task index to claim.
    next: Padded<AtomicUsize>,
    /// Helper threads that have not finished the current job.
    pending: Padded<AtomicUsize>,
    tasks: AtomicUsize,
    /// The current job. Written by the caller before it bumps `generation` (release) and read by
    /// helpers after they observe the bump (acquire); the caller keeps the closure alive until
    /// `pending` reaches zero.
    job: std::cell::UnsafeCell<Option<Job>>,
    stop: AtomicBool,
    sleeping: Vec<Padded<AtomicBool>>,
    handles: std::sync::OnceLock<Vec<Thread>>,
}

// SAFETY: `job` is only written while no helper reads it (between jobs, under the protocol
// above); everything else is atomic.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
    /// CPU for the calling thread when the pool is pinned.
    caller_cpu: Option<usize>,
}

thread_local! {
    static CURRENT: Cell<*const ThreadPool> = const { Cell::new(std::ptr::null()) };
}

/// The CPUs this process may run on, in ascending order (empty if unknown).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Restricts the calling thread (or, before other threads exist, the process) to `cpus`.
pub fn set_affinity(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: as above; CPU_SET indices are bounded by CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(std::io::Error::other(format!("CPU {c} is out of range")));
            }
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Parses a CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{s}` in CPU list `{text}` is not a CPU number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (number(a)?, number(b)?);
                if a > b || b >= libc::CPU_SETSIZE as usize {
                    return Err(format!("bad CPU range `{part}` in `{text}`"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(number(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(format!("CPU list `{text}` names no CPU"));
    }
    Ok(cpus)
}

impl ThreadPool {
    /// A pool of `threads` threads including the caller. With `pin = Some(cpus)`, thread `i`
    /// (the caller being thread 0, pinned each time it installs the pool) runs only on
    /// `cpus[i % cpus.len()]`.
    pub fn new(threads: usize, pin: Option<&[usize]>) -> std::io::Result<ThreadPool> {
        let threads = threads.max(1);
        let helpers = threads - 1;
        let shared = Arc::new(Shared {
            generation: Padded(AtomicU64::new(0)),
            next: Padded(AtomicUsize::new(0)),
            pending: Padded(AtomicUsize::new(0)),
            tasks: AtomicUsize::new(0),
            job: std::cell::UnsafeCell::new(None),
            stop: AtomicBool::new(false),
            sleeping: (0..helpers)
                .map(|_| Padded(AtomicBool::new(false)))
                .collect(),
            handles: std::sync::OnceLock::new(),
        });
        let cpu_of = |i: usize| pin.filter(|c| !c.is_empty()).map(|c| c[i % c.len()]);
        let mut workers = Vec::with_capacity(helpers);
        for index in 0..helpers {
            let shared = shared.clone();
            let cpu = cpu_of(index + 1);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("tp-compute-{}", index + 1))
                    .spawn(move || {
                        if let Some(cpu) = cpu
                            && let Err(e) = set_affinity(&[cpu])
                        {
                            tracing::warn!(cpu, "cannot pin compute thread: {e}");
                        }
                        helper_loop(&shared, index)
                    })?,
            );
        }
        let _ = shared
            .handles
            .set(workers.iter().map(|w| w.thread().clone()).collect());
        Ok(ThreadPool {
            shared,
            workers,
            threads,
            caller_cpu: cpu_of(0),
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` with this pool as the calling thread's pool (see [`for_each`]).
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        if let Some(cpu) = self.caller_cpu {
            let _ = set_affinity(&[cpu]);
        }
        let previous = CURRENT.with(|c| c.replace(self as *const ThreadPool));
        struct Restore(*const ThreadPool);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(previous);
        f()
    }

    /// Calls `f(t)` for every `t < tasks`, spread over the pool's threads; returns when all
    /// calls have returned. A panic in a task aborts the process (tasks are kernels that do
    /// not panic on valid input; unwinding across the pool would leave helpers mid-job).
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.threads == 1 || tasks == 1 {
            (0..tasks).for_each(f);
            return;
        }
        let shared = &*self.shared;
        // SAFETY: no helper reads `job` now: the previous job's `pending` reached zero, and a
        // helper only reads it after the generation bump below. The lifetime is erased; the
        // closure outlives its use because this function waits for `pending` to drain.
        unsafe {
            *shared.job.get() = Some(std::mem::transmute::<
                &(dyn Fn(usize) + Sync),
                &'static (dyn Fn(usize) + Sync),
            >(f) as Job);
        }
        shared.tasks.store(tasks, Ordering::Relaxed);
        shared.next.0.store(0, Ordering::Relaxed);
        shared
            .pending
            .0
            .store(self.workers.len(), Ordering::Relaxed);
        shared.generation.0.fetch_add(1, Ordering::SeqCst);
        if let Some(handles) = shared.handles.get() {
            for (flag, handle) in shared.sleeping.iter().zip(handles) {
                if flag.0.load(Ordering::SeqCst) {
                    handle.unpark();
                }
            }
        }
        let guard = AbortOnPanic;
        run_tasks(shared, f);
        let started = Instant::now();
        let mut spins = 0u32;
        let mut yielding = false;
        while shared.pending.0.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if !yielding && spins % 64 == 0 {
                yielding = started.elapsed() >= JOIN_SPIN;
            }
            if yielding {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        std::mem::forget(guard);
    }
}

struct AbortOnPanic;
impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        eprintln!("tp: a compute task panicked; aborting");
        std::process::abort();
    }
}

fn run_tasks(shared: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let tasks = shared.tasks.load(Ordering::Relaxed);
    loop {
        let t = shared.next.0.fetch_add(1, Ordering::Relaxed);
        if t >= tasks {
            break;
        }
        f(t);
    }
}

fn helper_loop(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = shared.generation.0.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if spins % 64 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let idle = started.elapsed();
            if idle < SPIN {
                std::hint::spin_loop();
            } else if idle < YIELD {
                std::thread::yield_now();
            } else {
                // Sleep until the caller sees the flag and unparks us. The SeqCst store and
                // load pair with the caller's SeqCst bump and flag load: either we see the new
                // generation here, or the caller sees our flag and unparks (park keeps a token,
                // so an unpark that comes first is not lost).
                let flag = &shared.sleeping[index].0;
                flag.store(true, Ordering::SeqCst);
                if shared.generation.0.load(Ordering::SeqCst) == seen
                    && !shared.stop.load(Ordering::SeqCst)
                {
                    std::thread::park_timeout(Duration::from_millis(100));
                }
                flag.store(false, Ordering::SeqCst);
            }
        }
        // SAFETY: set before the generation bump we just observed (acquire), and kept alive by
        // the caller until we decrement `pending`.
        let job = unsafe { (*shared.job.get()).expect("job published with its generation") };
        let guard = AbortOnPanic;
        run_tasks(shared, unsafe { &*job });
        std::mem::forget(guard);
        shared.pending.0.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for worker in &self.workers {
            worker.thread().unpark();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Threads of the calling thread's pool (1 when none is installed).
pub fn threads() -> usize {
    CURRENT.with(|c| {
        let pool = c.get();
        // SAFETY: set by `install`, which outlives every call made inside it.
        if pool.is_null() {
            1
        } else {
            unsafe { (*pool).threads }
        }
    })
}

/// Calls `f(t)` for `t < tasks` on the calling thread's pool, or serially without one.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    // Taking the pool out while its job runs makes a nested call run serially.
    let pool = CURRENT.with(|c| c.replace(std::ptr::null()));
    if pool.is_null() {
        (0..tasks).for_each(f);
        return;
    }
    struct Restore(*const ThreadPool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let restore = Restore(pool);
    // SAFETY: as in `threads`.
    unsafe { (*restore.0).run(tasks, &f) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = ThreadPool::new(3, None).unwrap();
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        pool.install(|| {
            for job in 0..2000 {
                let n = 1 + job % 1000;
                for_each(n, |t| {
                    counts[t].fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        // Task t ran once in every job with more than t tasks.
        for (t, c) in counts.iter().enumerate() {
            let expected = (0..2000).filter(|job| 1 + job % 1000 > t).count();
            assert_eq!(c.load(Ordering::Relaxed), expected, "task {t}");
        }
    }

    #[test]
    fn helpers_wake_after_parking() {
        let pool = ThreadPool::new(2, None).unwrap();
        let sum = AtomicUsize::new(0);
        pool.install(|| {
            for _ in 0..3 {
                std::thread::sleep(YIELD + Duration::from_millis(5));
                for_each(64, |t| {
                    sum.fetch_add(t, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(sum.load(Ordering::Relaxed), 3 * (0..64).sum::<usize>());
    }

    #[test]
    fn no_pool_runs_serially() {
        assert_eq!(threads(), 1);
        let sum = AtomicUsize::new(0);
        for_each(10, |t| {
            sum.fetch_add(t, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    #[test]
    fn cpu_lists_parse_and_reject_garbage() {
        assert_eq!(parse_cpu_list("0-2,5, 7").unwrap(), vec![0, 1, 2, 5, 7]);
        assert_eq!(parse_cpu_list("3,1,3").unwrap(), vec![1, 3]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("").is_err());
        assert!(parse_cpu_list("0-99999").is_err());
    }
}
