//! What a person sees on stderr besides the logs: spinners and progress
//! bars, drawn only when stderr is a terminal and never with `--quiet`, and
//! colour only on a terminal without `NO_COLOR` (https://no-color.org).

use std::io::IsTerminal;
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
        eprintln!("{line}");
    }
}
