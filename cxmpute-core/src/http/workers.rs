//! Serving threads: [`ServeConfig::threads`](super::ServeConfig::threads)
//! threads, each running a single-threaded runtime of its own, that take
//! accepted connections in turn.
//!
//! Why: on a work-stealing runtime a call's connection, its task and its
//! connection to the node run wherever a worker is free, and every hand-off
//! between them may wake another thread. On a serving thread all three stay
//! on one thread (the node client keeps a pool per serving thread, see
//! [`index`]), which measured about a fifth less CPU per proxied call on a
//! two-core host.
//!
//! A gateway call outlives its connection when its caller hangs up (it runs
//! to its end and is settled). Such tasks are spawned through [`tracked`], so
//! that stopping the threads waits for them rather than dropping a call
//! between its answer and its settlement.

use std::cell::{Cell, RefCell};
use std::future::Future;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

thread_local! {
    /// The serving thread this is (1..), 0 on any other thread.
    static INDEX: Cell<usize> = const { Cell::new(0) };
    /// The calls that outlive their connection on this serving thread.
    static CALLS: RefCell<Option<TaskTracker>> = const { RefCell::new(None) };
}

/// The serving thread this runs on, counted from 1; 0 on any other thread
/// (a runtime of the embedder's, a test's).
pub(crate) fn index() -> usize {
    INDEX.with(Cell::get)
}

/// `task`, counted as a call of the serving thread it is created on (when it
/// is created on one), so that the thread is not stopped before it ends.
pub(crate) fn tracked<F: Future>(task: F) -> impl Future<Output = F::Output> {
    let token = CALLS.with(|c| c.borrow().as_ref().map(TaskTracker::token));
    async move {
        let out = task.await;
        drop(token);
        out
    }
}

/// The serving threads of one [`serve`](super::serve).
pub(crate) struct Workers {
    threads: Vec<Worker>,
    next: usize,
}

struct Worker {
    handle: Handle,
    calls: TaskTracker,
    /// Dropped (or sent) to stop the thread's runtime.
    stop: Option<oneshot::Sender<()>>,
    /// Resolves once the thread dropped its runtime.
    done: oneshot::Receiver<()>,
}

/// How often a serving thread's timer wheel is made to wake, at the least.
const NEAR: std::time::Duration = std::time::Duration::from_millis(25);

/// Keeps a timer due within [`NEAR`] on the thread's runtime, for ever.
///
/// Why: tokio interrupts its driver (a write to the runtime's eventfd, and
/// a spurious turn of its loop) whenever a timer is set earlier than the
/// driver's next planned wake. A call sets two (its hedge and its first
/// byte's wait, 50 ms at the least), and with no nearer timer pending each
/// of them did: about one syscall a call. With this one pending, a call's
/// timers are never the nearest; it costs the thread 40 wake-ups a second.
async fn keep_timers_near() {
    let mut tick = tokio::time::interval(NEAR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

impl Workers {
    /// Starts `n` serving threads.
    pub(crate) fn start(n: usize) -> std::io::Result<Workers> {
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let calls = TaskTracker::new();
            let (stop, stopped) = oneshot::channel::<()>();
            let (finished, done) = oneshot::channel::<()>();
            let thread_calls = calls.clone();
            std::thread::Builder::new()
                .name(format!("cxmpute-serve-{}", i + 1))
                .spawn(move || {
                    INDEX.with(|x| x.set(i + 1));
                    CALLS.with(|c| *c.borrow_mut() = Some(thread_calls));
                    // Runs until told to stop, or until the `Workers` is
                    // dropped (a cancelled `serve`).
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            _ = keep_timers_near() => {}
                        }
                    });
                    drop(runtime);
                    let _ = finished.send(());
                })?;
            threads.push(Worker {
                handle,
                calls,
                stop: Some(stop),
                done,
            });
        }
        Ok(Workers { threads, next: 0 })
    }

    /// Runs `task` on the next serving thread in turn.
    pub(crate) fn spawn<F>(&mut self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let worker = &self.threads[self.next];
        self.next = (self.next + 1) % self.threads.len();
        worker.handle.spawn(task);
    }

    /// Waits for the calls still running on the threads (their connections
    /// are closed by now), then stops the threads and waits for them.
    pub(crate) async fn stop(mut self) {
        for w in &self.threads {
            w.calls.close();
            w.calls.wait().await;
        }
        for w in &mut self.threads {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in self.threads.drain(..) {
            let _ = w.done.await;
        }
    }
}
