//! The thread the monitors run on, with their checks and member probes.
//!
//! The API answers from bytes rendered ahead of time, so a GET costs microseconds; what delays
//! it is waiting for a core. Checks are the daemon's steady bulk work (connections, HTTP,
//! JSON); on a thread of their own, one thread with no work stealing between workers, a check
//! costs fewer wake-ups, and the thread runs at a lower scheduling priority so that the kernel
//! prefers the API's threads whenever both want a core. Probes for registrations and settings
//! changes stay on the API's threads: an operator is waiting on each.
//!
//! One thread checks thousands of clusters per second: a check costs about 0.14 ms of CPU.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How much less the Proxmox thread weighs than the API's threads for the kernel's scheduler:
/// a niceness of 5 is about a third of the CPU share, still far more than checks need.
const NICENESS: i32 = 5;

/// Where the monitors run. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxmoxRuntime {
    handle: Handle,
}

/// Keeps the Proxmox thread running; dropping it stops the thread and every task on it
/// (without waiting: the caller may be on an async thread itself).
#[derive(Debug)]
pub struct ProxmoxThread {
    _stop: oneshot::Sender<()>,
}

impl ProxmoxRuntime {
    /// Starts the Proxmox thread.
    pub fn start() -> std::io::Result<(Self, ProxmoxThread)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("proxmox".to_owned())
            .spawn(move || {
                // Best effort: a scheduler that refuses leaves the thread at the API's priority.
                let tid = rustix::thread::gettid();
                if let Err(e) = rustix::process::setpriority_process(Some(tid), NICENESS) {
                    tracing::debug!(error = %e, "cannot lower the Proxmox thread's priority");
                }
                // Ends when the sender is dropped.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok((Self { handle }, ProxmoxThread { _stop: stop }))
    }

    /// The runtime the caller runs on, for tests that start a registry of their own.
    pub fn current() -> Self {
        Self {
            handle: Handle::current(),
        }
    }

    /// A runtime of the test's choosing, such as one nobody drives.
    #[cfg(test)]
    pub fn on(handle: Handle) -> Self {
        Self { handle }
    }

    /// While the guard lives, tasks spawned by the caller run on the Proxmox thread.
    pub fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.handle.enter()
    }
}
