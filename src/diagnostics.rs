//! What error reports show of the logs: the end of a file (read from its
//! last 64 KiB however large the file), a titled section, and the guest
//! kernel's panic report from the serial console. Nothing here escapes: the
//! error report escapes everything it prints.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the end of a file the diagnostics read.
const TAIL_WINDOW: u64 = 64 << 10;

/// The text of the last [`TAIL_WINDOW`] bytes of a file (empty if
/// unreadable), without a partial first line.
fn end_of(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else { return String::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_WINDOW);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.take(TAIL_WINDOW).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        (true, None) => String::new(),
        (false, _) => text,
    }
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail_of(path: &Path, lines: usize) -> String {
    let text = end_of(path);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `body` under a `--- title ---` line, for error messages (empty when `body` is).
pub fn section(title: &str, body: &str) -> String {
    if body.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- {title} ---\n{}", body.trim_end())
    }
}

/// The serial console from the guest kernel's last panic message on (at
/// most 40 lines), or `None` when it did not panic.
pub fn panic_report(serial_log: &Path) -> Option<String> {
    let text = end_of(serial_log);
    let start = text.rfind("Kernel panic - not syncing")?;
    let start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    Some(text[start..].lines().take(40).collect::<Vec<_>>().join("\n"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn tail_reads_only_the_end_of_a_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let mut f = File::create(&path).unwrap();
        for i in 0..200_000 {
            writeln!(f, "line {i}").unwrap();
        }
        assert_eq!(tail_of(&path, 2), "line 199998\nline 199999");
        assert_eq!(tail_of(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn the_panic_is_found_at_the_end_of_a_long_console() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut f = File::create(&path).unwrap();
        for i in 0..100_000 {
            writeln!(f, "[ {i}] boot message").unwrap();
        }
        writeln!(f, "[ 9.9] Kernel panic - not syncing: sysrq triggered crash\n[ 9.9] CPU: 0 PID: 1\n[ 9.9] Call Trace:").unwrap();
        drop(f);
        let report = panic_report(&path).unwrap();
        assert!(report.starts_with("[ 9.9] Kernel panic - not syncing: sysrq triggered crash"), "{report}");
        assert!(report.ends_with("Call Trace:"), "{report}");
        assert_eq!(panic_report(&dir.path().join("missing")), None);
    }
}
