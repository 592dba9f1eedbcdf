//! SIGINT and SIGTERM handling. The first signal sets a process-wide flag that
//! every stage checks (blocking code) or awaits (async code); the stage then
//! stops its children and cleans up, and the CLI exits 130.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

static SIGNAL: AtomicI32 = AtomicI32::new(0);

fn notify() -> &'static Notify {
    static NOTIFY: OnceLock<Notify> = OnceLock::new();
    NOTIFY.get_or_init(Notify::new)
}

/// The run was interrupted by a signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.signal))]
pub struct Interrupted {
    /// The signal number.
    pub signal: i32,
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Starts listening for SIGINT and SIGTERM (call once, inside the runtime).
pub fn install() -> std::io::Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            let signal = tokio::select! {
                _ = int.recv() => libc::SIGINT,
                _ = term.recv() => libc::SIGTERM,
            };
            let first = SIGNAL.swap(signal, Ordering::SeqCst) == 0;
            // Waiters first: nothing that logging does (stderr may be gone)
            // may keep the stages from hearing of the signal.
            notify().notify_waiters();
            if first {
                tracing::warn!("{}: stopping and cleaning up", signal_name(signal));
            }
        }
    });
    Ok(())
}

/// `Err` once a signal has arrived.
pub fn check() -> Result<(), Interrupted> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => Err(Interrupted { signal }),
    }
}

/// Resolves when a signal arrives (at once if one already has).
pub async fn wait() -> Interrupted {
    loop {
        let notified = notify().notified();
        if let Err(e) = check() {
            return e;
        }
        notified.await;
    }
}
