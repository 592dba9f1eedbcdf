//! Accelerator choice. `auto` uses KVM only when a guest really boots under
//! it: a /dev/kvm that opens but cannot boot a stock kernel (such as the
//! paravirtual KVM of some cloud sandboxes) is caught by the boot watchdog in
//! [`crate::vm::machine`] and answered by falling back to TCG.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::vm::args::Accelerator;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when it works, TCG otherwise.
    Auto,
    /// KVM or fail.
    Kvm,
    /// Software emulation only.
    Tcg,
}

/// KVM's stable API version (`KVM_GET_API_VERSION`).
const KVM_API_VERSION: i32 = 12;
/// `_IO(KVMIO, 0x00)`
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// Why /dev/kvm cannot be used, or `Ok` when it opens and speaks the API.
pub fn probe_kvm(device: &Path) -> Result<(), String> {
    let file = OpenOptions::new().read(true).write(true).open(device).map_err(|e| format!("cannot open {}: {e}", device.display()))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return Err(format!("{} answers KVM API version {version}, expected {KVM_API_VERSION}", device.display()));
    }
    Ok(())
}

/// The accelerators to try, in order, for a choice: `auto` tries KVM first
/// (when it probes fine) and keeps TCG as the fallback.
pub fn candidates(choice: AccelChoice, kvm_probe: Result<(), String>) -> Result<Vec<Accelerator>, String> {
    match (choice, kvm_probe) {
        (AccelChoice::Tcg, _) => Ok(vec![Accelerator::Tcg]),
        (AccelChoice::Kvm, Ok(())) => Ok(vec![Accelerator::Kvm]),
        (AccelChoice::Kvm, Err(why)) => Err(why),
        (AccelChoice::Auto, Ok(())) => Ok(vec![Accelerator::Kvm, Accelerator::Tcg]),
        (AccelChoice::Auto, Err(why)) => {
            tracing::debug!("KVM unavailable ({why}); using TCG");
            Ok(vec![Accelerator::Tcg])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_tcg() {
        assert_eq!(candidates(AccelChoice::Auto, Ok(())).unwrap(), [Accelerator::Kvm, Accelerator::Tcg]);
        assert_eq!(candidates(AccelChoice::Auto, Err("no".into())).unwrap(), [Accelerator::Tcg]);
        assert!(candidates(AccelChoice::Kvm, Err("no".into())).is_err());
        assert_eq!(candidates(AccelChoice::Tcg, Ok(())).unwrap(), [Accelerator::Tcg]);
    }

    #[test]
    fn probe_of_a_missing_device_says_why() {
        let err = probe_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(err.contains("/nonexistent/kvm"), "{err}");
    }
}
