//! What a person sees on stderr besides the logs: spinners and progress
//! bars, drawn only when stderr is a terminal and never with `--quiet`, and
//! colour only on a terminal without `NO_COLOR` (https://no-color.org).

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no stage lines, no live build output, no bars; only warnings,
/// errors and what goes to stdout.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether bars and spinners are drawn: stderr is a terminal and not `--quiet`.
pub fn draws() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// Whether stderr may carry colour: a terminal, and `NO_COLOR` unset or empty.
pub fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A spinner with `message` and the elapsed time, or a hidden one.
pub fn spinner(message: &str) -> ProgressBar {
    if !draws() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(message.to_string());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("a valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A byte-counting bar towards `total` (unknown: a counter without a bar),
/// or a hidden one.
pub fn bytes_bar(message: &str, total: Option<u64>) -> ProgressBar {
    if !draws() {
        return ProgressBar::hidden();
    }
    let bar = total.map_or_else(ProgressBar::no_length, ProgressBar::new);
    bar.set_style(ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}").expect("a valid template"));
    bar.set_message(message.to_string());
    bar
}

/// Prints an informational line on stderr (a stage's summary, where the
/// output went), unless `--quiet`.
pub fn note(line: std::fmt::Arguments) {
    if !quiet() {
        say(line);
    }
}

/// Prints a line on stderr whatever became of it: `eprintln!` panics when
/// stderr is gone (a closed pipe, a CI log reader that died), and reprovm
/// must still stop QEMU and clean up then.
pub fn say(line: std::fmt::Arguments) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// Standard error for the logs: a write that fails (stderr gone) counts as
/// done, so that the logger never reports — by panicking — that it could
/// not log.
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// Like [`say`], without adding a newline.
pub fn say_raw(text: std::fmt::Arguments) {
    let _ = write!(io::stderr().lock(), "{text}");
}
