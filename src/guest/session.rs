//! SSH to the builder with the `ssh2` crate (blocking: callers keep it on a
//! blocking thread). Only the host key generated for this run is accepted;
//! ready means an authenticated session, not an open port (user-mode
//! networking accepts TCP connections before sshd listens).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::deadline::{Deadline, Timeout};
use crate::guest::keys::RunKeys;

/// The user sessions log in as; commands are then run as the contract's
/// build user.
const LOGIN_USER: &str = "root";
/// The most a captured stream keeps (reports and facts are kilobytes).
pub const CAPTURE_LIMIT: usize = 16 << 20;

/// A captured stream: its first [`CAPTURE_LIMIT`] bytes, the rest dropped.
#[derive(Default)]
struct Capture(Vec<u8>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = CAPTURE_LIMIT.saturating_sub(self.0.len());
        self.0.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An SSH failure.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest presented a host key other than the one generated for this run.
    #[error("refusing the guest: it presented host key {actual}, not the key generated for this run ({expected}); something else answered on the SSH forward")]
    HostKeyMismatch {
        /// SHA-256 of the expected key blob.
        expected: String,
        /// SHA-256 of the key blob presented.
        actual: String,
    },
    /// Not connected yet (sshd not listening, handshake cut short…).
    #[error("{0}")]
    NotReady(String),
    /// An SSH operation failed on an established session.
    #[error("SSH {action} failed")]
    Ssh {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: ssh2::Error,
    },
    /// The command ran past its deadline (it is left to the VM's teardown).
    #[error(transparent)]
    Deadline(#[from] Timeout),
    /// Reading or writing the streams failed.
    #[error("SSH {action} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn ssh_err(action: &'static str) -> impl FnOnce(ssh2::Error) -> GuestError {
    move |source| GuestError::Ssh { action, source }
}

fn io_err(action: &'static str) -> impl FnOnce(io::Error) -> GuestError {
    move |source| GuestError::Io { action, source }
}

fn fingerprint(blob: &[u8]) -> String {
    use sha2::Digest;
    format!("SHA256:{}", hex::encode(sha2::Sha256::digest(blob)))
}

/// An authenticated SSH session with the builder.
pub struct GuestSession {
    session: ssh2::Session,
    socket: TcpStream,
}

impl GuestSession {
    /// One attempt to connect to 127.0.0.1:`port`, check the host key and
    /// authenticate, each step allowed `limit`. `NotReady` means "try
    /// again"; other errors are final.
    pub fn connect(port: u16, keys: &RunKeys, limit: Duration) -> Result<GuestSession, GuestError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let limit = limit.max(Duration::from_millis(1));
        let socket = TcpStream::connect_timeout(&addr, limit).map_err(|e| GuestError::NotReady(format!("connect to {addr}: {e}")))?;
        socket.set_nodelay(true).map_err(io_err("set TCP_NODELAY"))?;
        let mut session = ssh2::Session::new().map_err(ssh_err("session set-up"))?;
        session.set_tcp_stream(socket.try_clone().map_err(io_err("clone the socket"))?);
        session.set_timeout(u32::try_from(limit.as_millis()).unwrap_or(u32::MAX));
        session.method_pref(ssh2::MethodType::HostKey, "ssh-ed25519").map_err(ssh_err("host key preference"))?;
        session.handshake().map_err(|e| GuestError::NotReady(format!("SSH handshake: {e}")))?;
        let (blob, _) = session.host_key().ok_or_else(|| GuestError::NotReady("no host key offered".into()))?;
        if blob != keys.host_public_blob.as_slice() {
            return Err(GuestError::HostKeyMismatch { expected: fingerprint(&keys.host_public_blob), actual: fingerprint(blob) });
        }
        session
            .userauth_pubkey_memory(LOGIN_USER, None, &keys.client_private, None)
            .map_err(|e| GuestError::NotReady(format!("authentication: {e}")))?;
        if !session.authenticated() {
            return Err(GuestError::NotReady("authentication incomplete".into()));
        }
        session.set_timeout(0);
        session.set_keepalive(true, 15);
        Ok(GuestSession { session, socket })
    }

    /// Runs `command` (a shell command line, as root) and returns its exit
    /// status, streaming its stdout and stderr into the writers as they come.
    pub fn exec(&self, command: &str, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<i32, GuestError> {
        self.exec_until(command, None, stdout, stderr)
    }

    /// [`GuestSession::exec`] that gives up with [`GuestError::Deadline`]
    /// once `deadline` (if any) passes; `what` names the command in that error.
    pub fn exec_until(
        &self,
        command: &str,
        deadline: Option<(Deadline, &'static str)>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<i32, GuestError> {
        let mut channel = self.session.channel_session().map_err(ssh_err("open a channel"))?;
        channel.exec(command).map_err(ssh_err("exec"))?;
        self.pump(&mut channel, None, deadline, stdout, stderr)?;
        channel.wait_close().map_err(ssh_err("close the channel"))?;
        channel.exit_status().map_err(ssh_err("read the exit status"))
    }

    /// Runs `command` as root and returns (status, stdout, stderr).
    pub fn exec_capture(&self, command: &str) -> Result<(i32, String, String), GuestError> {
        self.exec_capture_until(command, None)
    }

    /// [`GuestSession::exec_capture`] with the deadline of [`GuestSession::exec_until`].
    /// Each stream keeps its first [`CAPTURE_LIMIT`] bytes: what the guest
    /// prints costs the host bounded memory.
    pub fn exec_capture_until(
        &self,
        command: &str,
        deadline: Option<(Deadline, &'static str)>,
    ) -> Result<(i32, String, String), GuestError> {
        let (mut out, mut err) = (Capture::default(), Capture::default());
        let status = self.exec_until(command, deadline, &mut out, &mut err)?;
        Ok((status, String::from_utf8_lossy(&out.0).into_owned(), String::from_utf8_lossy(&err.0).into_owned()))
    }

    /// Runs `command` (a whole command line, see
    /// `contract::user_command`) on a PTY of `size` (columns, rows), wired to
    /// `input` and `output`; returns its exit status.
    pub fn exec_on_pty(
        &self,
        command: &str,
        term: &str,
        size: (u32, u32),
        input: BorrowedFd<'_>,
        output: &mut dyn Write,
    ) -> Result<i32, GuestError> {
        let mut channel = self.session.channel_session().map_err(ssh_err("open a channel"))?;
        channel.request_pty(term, None, Some((size.0, size.1, 0, 0))).map_err(ssh_err("request a PTY"))?;
        channel.exec(command).map_err(ssh_err("start the command"))?;
        self.pump(&mut channel, Some(input), None, output, &mut io::sink())?;
        channel.wait_close().map_err(ssh_err("close the channel"))?;
        channel.exit_status().map_err(ssh_err("read the exit status"))
    }

    /// Moves bytes between the channel and the writers (and `input`, if
    /// given) until the remote side closes or the deadline passes, waiting
    /// in poll(2) when idle.
    fn pump(
        &self,
        channel: &mut ssh2::Channel,
        input: Option<BorrowedFd<'_>>,
        deadline: Option<(Deadline, &'static str)>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<(), GuestError> {
        self.session.set_blocking(false);
        let result = (|| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut input_open = input.is_some();
            loop {
                let mut progressed = false;
                for stream_id in [0, 1] {
                    let mut stream = channel.stream(stream_id);
                    match stream.read(&mut buf) {
                        Ok(0) => {}
                        Ok(n) => {
                            let sink: &mut dyn Write = if stream_id == 0 { &mut *stdout } else { &mut *stderr };
                            sink.write_all(&buf[..n]).map_err(io_err("write output"))?;
                            sink.flush().map_err(io_err("write output"))?;
                            progressed = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(io_err("read output")(e)),
                    }
                }
                if channel.eof() {
                    return Ok(());
                }
                if let Some((deadline, what)) = deadline.filter(|(d, _)| d.passed()) {
                    return Err(deadline.timeout(what, None).into());
                }
                if progressed {
                    continue;
                }
                let mut fds = vec![PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
                if let (Some(fd), true) = (input, input_open) {
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                }
                poll(&mut fds, PollTimeout::from(200u16)).map_err(|e| io_err("poll")(e.into()))?;
                let input_ready = fds.get(1).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
                if let (Some(fd), true) = (input, input_ready) {
                    let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(|e| io_err("read input")(e.into()))?;
                    if n == 0 {
                        input_open = false;
                        let _ = channel.send_eof();
                    } else {
                        write_all_nonblocking(channel, &buf[..n])?;
                    }
                }
                let _ = self.session.keepalive_send();
            }
        })();
        self.session.set_blocking(true);
        result
    }
}

fn write_all_nonblocking(channel: &mut ssh2::Channel, mut data: &[u8]) -> Result<(), GuestError> {
    while !data.is_empty() {
        match channel.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) => return Err(io_err("send input")(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest answering a captured command with a gigabyte costs the host
    /// CAPTURE_LIMIT bytes, and the writer never fails (the channel is read
    /// to its end).
    #[test]
    fn a_gigabyte_into_a_capture_keeps_its_limit() {
        let mut capture = Capture::default();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..1024 {
            assert_eq!(capture.write(&chunk).unwrap(), chunk.len());
        }
        assert_eq!(capture.0.len(), CAPTURE_LIMIT);
    }

    /// A fake "guest" on a local port that answers each connection with
    /// `reply` and then stays silent.
    fn fake_guest(reply: &'static [u8]) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                let _ = stream.write_all(reply);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(30));
                    drop(stream);
                });
            }
        });
        port
    }

    #[test]
    fn a_silent_or_garbage_guest_is_refused_within_the_handshake_limit() {
        let keys = RunKeys::generate().unwrap();
        for reply in [&b""[..], b"HTTP/1.1 200 OK\r\n\r\n", b"SSH-2.0-fake\r\n\0\0\0\x0cgarbagegarbage"] {
            let port = fake_guest(reply);
            let start = std::time::Instant::now();
            let result = GuestSession::connect(port, &keys, Duration::from_secs(2));
            assert!(matches!(result, Err(GuestError::NotReady(_))), "{reply:?}");
            assert!(start.elapsed() < Duration::from_secs(6), "{reply:?} took {:?}", start.elapsed());
        }
    }

    #[test]
    fn connect_to_a_closed_port_is_not_ready() {
        let keys = RunKeys::generate().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        assert!(matches!(GuestSession::connect(port, &keys, Duration::from_secs(2)), Err(GuestError::NotReady(_))));
    }
}
