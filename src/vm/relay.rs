//! `reprovm egress-relay SOCKET`: what QEMU's user-mode networking runs for
//! each TCP connection the guest opens to the egress proxy's address. Its
//! standard input and output are that connection (one socket); it copies
//! bytes both ways between it and the proxy's Unix socket, and exits when
//! the proxy is done with the connection. It runs under QEMU's seccomp
//! filter and prints nothing: its standard error is the guest's connection
//! too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The first argument that makes the reprovm binary the relay (`main.rs`).
pub const RELAY_COMMAND: &str = "egress-relay";

/// Joins standard input and output to the proxy at `socket`.
pub fn relay(socket: &Path) -> io::Result<()> {
    let proxy = UnixStream::connect(socket)?;
    let to_proxy = proxy.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let copied = copy(&mut *guest_connection(0), &mut &to_proxy);
        let _ = to_proxy.shutdown(std::net::Shutdown::Write);
        copied
    });
    let copied = copy(&mut &proxy, &mut *guest_connection(1));
    // The proxy closed its side: the guest's connection ends with it (the
    // process exits, closing the socket, whatever the guest still sends).
    drop(upstream);
    copied
}

/// Descriptor `fd` (0 or 1: the guest's connection) as an unbuffered file
/// that is never closed here (standard output's line buffering would cut
/// the binary stream into small writes).
fn guest_connection(fd: i32) -> ManuallyDrop<File> {
    // SAFETY: 0 and 1 are open for the process's lifetime (QEMU passes the
    // connection as both) and ManuallyDrop never closes them.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Copies until end of file, in large writes.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
