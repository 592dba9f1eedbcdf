//! `reprovm egress-relay SOCKET`: what QEMU's user-mode networking runs for
//! each TCP connection the guest opens to the egress proxy's address. Its
//! standard input and output are that connection (one socket); it copies
//! bytes both ways between it and the proxy's Unix socket, and exits when
//! the proxy is done with the connection. It runs under QEMU's seccomp
//! filter and prints nothing: its standard error is the guest's connection
//! too.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Joins standard input and output to the proxy at `socket`.
pub fn relay(socket: &Path) -> io::Result<()> {
    let proxy = UnixStream::connect(socket)?;
    let to_proxy = proxy.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let copied = copy(&mut io::stdin().lock(), &mut &to_proxy);
        let _ = to_proxy.shutdown(std::net::Shutdown::Write);
        copied
    });
    let copied = copy(&mut &proxy, &mut io::stdout().lock());
    // The proxy closed its side: the guest's connection ends with it (the
    // process exits, closing the socket, whatever the guest still sends).
    drop(upstream);
    copied
}

/// `io::copy` that flushes after every read (standard output is buffered).
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => {
                to.write_all(&buf[..n])?;
                to.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
