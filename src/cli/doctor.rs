//! `reprovm doctor`: what this host can do, in one screen — whether KVM can
//! run the pinned machine (and why not), the QEMU and host tools found, free
//! space where reprovm writes, and what the image store and the download
//! cache hold. It changes nothing and exits 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::cli::Error;
use crate::escape::escape;
use crate::vm::args::{cpu_option, DEFAULT_CPU_MODEL, MACHINE_TYPE};
use crate::vm::machine::missing_kvm_features;
use crate::Exit;

/// How long QEMU must stay up with the pinned machine under KVM to count
/// as accepting it (it refuses a CPU model at once).
const ACCEPT_WAIT: Duration = Duration::from_secs(2);

/// Runs the checks and prints one line each.
pub async fn doctor() -> Result<u8, Error> {
    let lines = tokio::task::spawn_blocking(checks).await.expect("doctor thread panicked");
    for (what, verdict) in lines {
        println!("{what:<16} {}", escape(&verdict));
    }
    Ok(Exit::Ok.code())
}

fn checks() -> Vec<(&'static str, String)> {
    let qemu = std::env::var("REPROVM_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let mut lines = vec![("QEMU", first_line(&qemu, "--version").unwrap_or_else(|| format!("{qemu} not found: install qemu-system-x86")))];
    lines.push(("KVM", kvm_verdict(&qemu)));
    for (tool, arg, package) in [("qemu-img", "--version", "qemu-utils"), ("mmdebstrap", "--version", "mmdebstrap")] {
        let found = first_line(tool, arg).unwrap_or_else(|| format!("not found: install {package}"));
        lines.push((tool, found));
    }
    lines.push((
        "mkfs.ext4",
        match crate::host_tools::check_mke2fs() {
            Ok(()) => "can populate a filesystem from a tar (e2fsprogs >= 1.47.1)".into(),
            Err(e) => e.to_string(),
        },
    ));
    match crate::image::Store::from_env() {
        Ok(store) => {
            let images = store.list().map(|list| list.iter().map(|i| i.pin.to_string()).collect::<Vec<_>>());
            lines.push(("image store", format!("{} ({})", store.root().display(), free_space(store.root()))));
            lines.push((
                "images",
                match images {
                    Ok(pins) if pins.is_empty() => "none: run `reprovm image build` (or `image fetch`)".into(),
                    Ok(pins) => pins.join(" "),
                    Err(e) => e.to_string(),
                },
            ));
        }
        Err(e) => lines.push(("image store", e.to_string())),
    }
    if let Ok(cache) = crate::egress::DownloadCache::open_default() {
        let (count, bytes) = std::fs::read_dir(cache.dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .fold((0u64, 0u64), |(n, b), e| (n + 1, b + e.metadata().map(|m| m.len()).unwrap_or(0)));
        lines.push(("download cache", format!("{}: {count} downloads, {:.1} MiB", cache.dir().display(), bytes as f64 / 1048576.0)));
    }
    let tmp = std::env::temp_dir();
    lines.push(("run files", format!("{} ({})", tmp.display(), free_space(&tmp))));
    lines
}

/// Whether KVM can run the pinned machine here, and why not.
fn kvm_verdict(qemu: &str) -> String {
    if let Err(why) = crate::vm::accel::probe_kvm(Path::new("/dev/kvm")) {
        return format!("not usable: {why}; builds run under TCG (same bytes, slower)");
    }
    let cpu = cpu_option(DEFAULT_CPU_MODEL);
    let child = Command::new(qemu)
        .args(["-machine", &format!("{MACHINE_TYPE},accel=kvm"), "-cpu", &cpu])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-S", "-monitor", "none", "-serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return format!("cannot tell: {qemu}: {e}"),
    };
    std::thread::sleep(ACCEPT_WAIT);
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
        return format!(
            "/dev/kvm opens and QEMU accepts {DEFAULT_CPU_MODEL} under it; `--accel auto` still falls back to TCG if the builder hangs"
        );
    }
    let output = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
    let missing = missing_kvm_features(&output);
    if missing.is_empty() {
        let said = output.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("nothing");
        format!("not usable: QEMU refuses the pinned machine under KVM ({said}); builds run under TCG")
    } else {
        format!(
            "not usable: /dev/kvm opens, but this host's KVM lacks features of the pinned CPU model {DEFAULT_CPU_MODEL}: {}; builds run under TCG (same bytes, slower)",
            missing.join(" ")
        )
    }
}

/// The first line `program arg` prints, if it runs.
fn first_line(program: &str, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).stdin(Stdio::null()).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_string())
}

/// "N GiB free" for the filesystem holding `path` (or its nearest parent).
fn free_space(path: &Path) -> String {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    match rustix::fs::statvfs(existing) {
        Ok(s) => format!("{:.1} GiB free", (s.f_bavail * s.f_frsize) as f64 / (1u64 << 30) as f64),
        Err(e) => format!("free space unknown: {e}"),
    }
}
