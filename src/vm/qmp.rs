//! QMP through the `qapi` crate: handshake, `query-status`, `query-version`,
//! `quit`, and the events reprovm acts on (SHUTDOWN, GUEST_PANICKED, STOP).
//! Only basic commands are used: qapi's types come from a newer QEMU schema
//! than 7.2, and these are checked against the real QEMU by the VM tests.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::deadline::{Deadline, Timeout};

/// What happened to the guest, as QMP reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest powered off or QEMU is shutting down.
    Shutdown {
        /// Whether the guest initiated it.
        guest: bool,
        /// QEMU's reason.
        reason: String,
    },
    /// The guest kernel panicked (pvpanic).
    Panicked,
    /// The VM stopped running.
    Stopped,
}

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket never accepted a connection.
    #[error("cannot connect to QMP")]
    Connect(#[source] Timeout),
    /// The capabilities negotiation failed.
    #[error("QMP handshake failed")]
    Handshake(#[source] std::io::Error),
    /// A command failed or the connection broke.
    #[error("QMP command {command} failed")]
    Command {
        /// The command.
        command: &'static str,
        /// The cause.
        #[source]
        source: qapi::ExecuteError,
    },
    /// A command got no answer in time.
    #[error("QMP command {command} got no answer in time")]
    NoAnswer {
        /// The command.
        command: &'static str,
        /// The timeout.
        #[source]
        source: Timeout,
    },
}

/// A connected QMP monitor.
pub struct Qmp {
    service: QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>,
    events: mpsc::UnboundedReceiver<GuestEvent>,
}

fn translate(event: qmp::Event) -> Option<GuestEvent> {
    match event {
        qmp::Event::SHUTDOWN { data, .. } => Some(GuestEvent::Shutdown {
            guest: data.guest,
            reason: serde_json::to_value(data.reason).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        }),
        qmp::Event::GUEST_PANICKED { .. } => Some(GuestEvent::Panicked),
        qmp::Event::STOP { .. } => Some(GuestEvent::Stopped),
        _ => None,
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until it exists, up to
    /// `limit`) and negotiates capabilities.
    pub async fn connect(path: &Path, limit: Duration) -> Result<Qmp, QmpError> {
        let deadline = Deadline::after(limit);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if deadline.passed() => return Err(QmpError::Connect(deadline.timeout("the QMP socket", Some(e.to_string())))),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        // A monitor that never greets, or greets with garbage, must not hang us.
        let negotiation = tokio::time::timeout(deadline.remaining().max(Duration::from_secs(1)), QmpStreamTokio::open(stream))
            .await
            .map_err(|_| QmpError::Handshake(std::io::Error::other("no QMP greeting")))?
            .map_err(QmpError::Handshake)?;
        let stream = tokio::time::timeout(deadline.remaining().max(Duration::from_secs(1)), negotiation.negotiate())
            .await
            .map_err(|_| QmpError::Handshake(std::io::Error::other("no capabilities answer")))?
            .map_err(QmpError::Handshake)?;
        let (service, mut raw_events) = stream.into_parts();
        let (tx, events) = mpsc::unbounded_channel();
        // The event stream also carries command responses: keep it polled.
        tokio::spawn(async move {
            while let Some(event) = raw_events.next().await {
                match event {
                    Ok(event) => {
                        tracing::debug!("QMP event {event:?}");
                        if let Some(e) = translate(event) {
                            let _ = tx.send(e);
                        }
                    }
                    Err(e) => {
                        tracing::debug!("QMP stream ended: {e}");
                        break;
                    }
                }
            }
        });
        Ok(Qmp { service, events })
    }

    async fn execute<C>(&self, name: &'static str, command: C, limit: Duration) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command + qmp::QmpCommand + 'static,
    {
        let deadline = Deadline::after(limit);
        match tokio::time::timeout(limit, self.service.execute(command)).await {
            Ok(result) => result.map_err(|source| QmpError::Command { command: name, source }),
            Err(_) => Err(QmpError::NoAnswer { command: name, source: deadline.timeout("the answer", None) }),
        }
    }

    /// `query-status`: whether the guest is running, and QEMU's run state.
    pub async fn status(&self) -> Result<(bool, String), QmpError> {
        let info = self.execute("query-status", qmp::query_status {}, Duration::from_secs(5)).await?;
        let state = serde_json::to_value(info.status).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        Ok((info.running, state))
    }

    /// `quit`: QEMU exits at once.
    pub async fn quit(&self) -> Result<(), QmpError> {
        self.execute("quit", qmp::quit {}, Duration::from_secs(5)).await.map(drop)
    }

    /// A guest event that has already arrived, without waiting.
    pub fn pending_event(&mut self) -> Option<GuestEvent> {
        self.events.try_recv().ok()
    }
}

impl Qmp {
    /// `query-version`: QEMU's version as `major.minor.micro (package)`.
    pub async fn version(&self) -> Result<String, QmpError> {
        let v = self.execute("query-version", qmp::query_version {}, Duration::from_secs(5)).await?;
        Ok(format!("{}.{}.{} ({})", v.qemu.major, v.qemu.minor, v.qemu.micro, v.package.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    /// A fake monitor at a fresh socket that sends `greeting` (if any) to
    /// each connection and then stays silent.
    fn fake_monitor(greeting: Option<&'static [u8]>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                if let Some(g) = greeting {
                    let _ = stream.write_all(g).await;
                }
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(stream);
                });
            }
        });
        (dir, path)
    }

    #[tokio::test]
    async fn a_silent_or_garbage_monitor_is_an_error_within_the_limit() {
        for greeting in [None, Some(&b"garbage that is not JSON\n"[..]), Some(&b"{\"QMP\": {\"version\": 1}}\n"[..])] {
            let (_dir, path) = fake_monitor(greeting);
            let start = Instant::now();
            let result = Qmp::connect(&path, Duration::from_secs(1)).await;
            assert!(result.is_err(), "{greeting:?} was accepted");
            assert!(start.elapsed() < Duration::from_secs(5), "{greeting:?} took {:?}", start.elapsed());
        }
    }

    #[tokio::test]
    async fn a_missing_socket_times_out_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qmp::connect(&dir.path().join("none.sock"), Duration::from_millis(200)).await.err().unwrap();
        assert!(err.to_string().contains("QMP"), "{err}");
    }
}
