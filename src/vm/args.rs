//! The pure QEMU command-line builder. Everything the guest can observe is
//! fixed here: machine type, CPU model and features, vCPUs, memory, RTC,
//! devices. Only host-side paths, the port and the accelerator vary, and the
//! accelerator changes nothing the guest sees (see [`CPU_FEATURES`]).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::guest::contract::{FW_CFG_DIR, ROOT_PARAMETER};
use crate::image::bundle::Extent;

/// Versioned machine type: present in QEMU 7.2 and kept by later releases.
pub const MACHINE_TYPE: &str = "pc-q35-7.2";

/// The default CPU model. Nehalem-v1 is x86-64 with SSE4.2 and POPCNT but no
/// AES-NI or AVX: QEMU's TCG and every KVM host of the last dozen years
/// (Intel since Nehalem, AMD since Bulldozer) provide all of its features, so
/// `enforce` passes everywhere, and a build that probes the CPU (`-march=native`,
/// runtime dispatch) sees the same CPU on every host. Westmere-v1 would add
/// AES-NI and PCLMULQDQ, which some older or restricted hosts lack.
pub const DEFAULT_CPU_MODEL: &str = "Nehalem-v1";

/// `Ok` for a plain named CPU model; why not otherwise (`host` and `max`
/// differ from host to host, and features are reprovm's to fix).
pub fn check_cpu_model(value: &str) -> Result<(), String> {
    let base = value.split(',').next().unwrap_or_default();
    if matches!(base, "host" | "max") || base.is_empty() {
        return Err(format!("{value:?}: use a named CPU model such as Nehalem-v1; host and max differ from host to host"));
    }
    if !value.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.') {
        return Err(format!("{value:?}: a CPU model name only (features are fixed by reprovm)"));
    }
    Ok(())
}

/// Feature adjustments that make a named model look the same under KVM and
/// TCG: no KVM paravirt leaves or PMU (TCG has neither), no x2apic (QEMU 7.2's
/// TCG lacks it), no VME (TCG drops it by default), hypervisor bit always on.
///
/// The hypervisor leaf 0x40000000 is answered by each accelerator its own
/// way: TCG says "TCGTCGTCGTCG" (`tcg-cpuid=off` makes it zeros), while KVM
/// with `kvm=off` has no entry for it and answers with the highest basic
/// leaf, as an Intel CPU does for a leaf out of range (for Nehalem-v1 that
/// is leaf 0xb, the topology). `level=31` makes the highest basic leaf
/// 0x1f, which QEMU leaves empty for a one-die machine under both
/// accelerators (the guest kernel then reads the topology from leaf 0xb as
/// before): every out-of-range leaf, 0x40000000 included, reads zeros under
/// both. A model whose own highest leaf is above 0x1f loses those leaves.
pub const CPU_FEATURES: &str = "enforce,level=31,vme=off,x2apic=off,pmu=off,kvm=off,tcg-cpuid=off,hypervisor=on";

/// The vendor a named model declares. Under KVM, QEMU gives a named model
/// the *host's* vendor string unless `vendor=` is set, and the guest kernel
/// takes different code paths (and reports other flags) per vendor; so the
/// model's own vendor is always set explicitly.
pub fn model_vendor(model: &str) -> &'static str {
    let lower = model.to_ascii_lowercase();
    if ["epyc", "opteron", "phenom", "athlon", "qemu32", "qemu64"].iter().any(|p| lower.starts_with(p)) {
        "AuthenticAMD"
    } else if lower.starts_with("dhyana") {
        "HygonGenuine"
    } else {
        "GenuineIntel"
    }
}

/// The `-cpu` option for `model`: the model, its vendor pinned, and
/// [`CPU_FEATURES`].
pub fn cpu_option(model: &str) -> String {
    format!("{model},vendor={},{CPU_FEATURES}", model_vendor(model))
}

/// The kernel command line: the kernel's boot messages on the serial
/// console (`loglevel=7`, not `quiet`: they are the progress signal by which
/// the boot watchdog tells a slow guest from a hung one, about 25 KB per
/// boot at no measurable cost under TCG), PVH-friendly, panics turn
/// into an immediate reset (which `-no-reboot` makes QEMU exit on, after
/// pvpanic has reported GUEST_PANICKED). `clearcpuid=cpuid_fault`: KVM
/// offers CPUID faulting (MSR_PLATFORM_INFO) and TCG does not, which put a
/// `cpuid_fault` flag in /proc/cpuinfo under KVM only (seen through
/// scripts/test-kvm-nested); the kernel records the option as taint 4 under
/// both accelerators alike.
/// The root disk is named to the initrd by the contract's
/// `ROOT_PARAMETER` (see [`kernel_cmdline`]).
const KERNEL_CMDLINE: &str =
    "console=ttyS0 loglevel=7 panic=-1 edd=off random.trust_cpu=on tsc=reliable mitigations=off cryptomgr.notests clearcpuid=cpuid_fault";

/// The kernel's command line: [`KERNEL_CMDLINE`] and the root disk.
pub fn kernel_cmdline() -> String {
    format!("{KERNEL_CMDLINE} {ROOT_PARAMETER}=/dev/vda")
}

/// The accelerator QEMU runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accelerator {
    /// The name QEMU knows it by.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// The guest-visible machine, pinned by recipe or flags.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineSpec {
    /// Named CPU model, e.g. `Nehalem-v1`.
    pub cpu_model: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The guest's RTC start, seconds since 1970 (UTC).
    pub clock: i64,
}

/// Whether the guest may reach the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// No route out of the guest (user-mode networking with `restrict=on`);
    /// only the host's SSH forward reaches in.
    #[default]
    None,
    /// NAT to the outside through QEMU's user-mode networking.
    Nat,
    /// No route out, except TCP connections to [`EGRESS_PROXY`], which QEMU
    /// hands to reprovm's allow-listed, recording proxy through
    /// [`EgressRelay`] (docs/network.md). Set by a recipe's allow list, not
    /// by `--network`.
    #[value(skip)]
    Egress,
}

/// The address and port the guest reaches reprovm's egress proxy at (a
/// QEMU `guestfwd` inside user-mode networking's 10.0.2.0/24).
pub const EGRESS_PROXY: (&str, u16) = ("10.0.2.100", 3128);

/// How QEMU joins a guest connection to [`EGRESS_PROXY`] with reprovm's
/// proxy: user-mode networking runs `program egress-relay socket` for each
/// connection, its standard input and output being that connection, and
/// the relay copies bytes between them and the proxy's Unix socket. No TCP
/// port is opened on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRelay {
    /// The reprovm binary.
    pub program: PathBuf,
    /// The proxy's Unix socket (in a private 0700 directory).
    pub socket: PathBuf,
}

impl EgressRelay {
    /// The `guestfwd` rule, with QEMU's option commas doubled.
    fn guestfwd(&self) -> String {
        let quote =
            |p: &PathBuf| shlex::try_quote(&p.display().to_string()).map(|q| q.into_owned()).unwrap_or_else(|_| "/nonexistent".into());
        let command = format!("{} {} {}", quote(&self.program), crate::vm::relay::RELAY_COMMAND, quote(&self.socket));
        format!("guestfwd=tcp:{}:{}-cmd:{}", EGRESS_PROXY.0, EGRESS_PROXY.1, command.replace(',', ",,"))
    }
}

/// A disk besides the root filesystem: a raw file the guest finds by its
/// serial number (`/sys/block/vd*/serial`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraDisk {
    /// The raw image file.
    pub path: PathBuf,
    /// Serial number shown to the guest.
    pub serial: String,
}

/// Everything needed to start one QEMU.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    /// The guest-visible machine.
    pub spec: MachineSpec,
    /// The accelerator.
    pub accel: Accelerator,
    /// The verified bundle's open descriptor, inherited by QEMU and added to
    /// fd set 1: QEMU reads the very bytes that were hashed.
    pub bundle_fd: i32,
    /// Where the root filesystem lies inside the bundle.
    pub rootfs: Extent,
    /// The throw-away qcow2 overlay on top of it.
    pub overlay: PathBuf,
    /// Kernel and initrd copied out of the bundle.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
    /// QMP socket path.
    pub qmp_socket: PathBuf,
    /// Unix socket reprovm listens on; QEMU connects the serial console to it
    /// (reprovm writes the capped serial log).
    pub serial_socket: PathBuf,
    /// Host port forwarded (on 127.0.0.1 only) to the guest's port 22.
    pub ssh_port: u16,
    /// fw_cfg files: (name under the contract's `FW_CFG_DIR`, host path).
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// Disks after the root filesystem, in order.
    pub disks: Vec<ExtraDisk>,
    /// Network access.
    pub network: Network,
    /// With [`Network::Egress`]: the relay QEMU runs per guest connection.
    pub egress: Option<EgressRelay>,
    /// Confine QEMU with its seccomp sandbox (off only for a QEMU built
    /// without seccomp support).
    pub sandbox: bool,
}

/// QEMU's seccomp filter: no obsolete system calls, no privilege changes,
/// no new processes, no scheduler or affinity changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The filter with [`Network::Egress`]: QEMU must start the relay for each
/// guest connection, so it may spawn processes, and user networking's
/// child set-up calls setsid(2), which `elevateprivileges=deny` forbids
/// (docs/security.md).
pub const SANDBOX_EGRESS: &str = "on,obsolete=deny,resourcecontrol=deny";

/// RTC base in QEMU's format (`2024-11-25T00:00:00`).
pub fn rtc_base(clock: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(clock).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    t.format(&fmt).unwrap_or_else(|_| "1970-01-01T00:00:00".into())
}

/// The QEMU arguments (without the program name) for `plan`.
pub fn qemu_args(plan: &LaunchPlan) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));
    let p = |path: &PathBuf| path.display().to_string();
    let spec = &plan.spec;
    push(&["-name", "reprovm-builder"]);
    push(&["-machine", &format!("{MACHINE_TYPE},accel={}", plan.accel.as_str())]);
    push(&["-cpu", &cpu_option(&spec.cpu_model)]);
    push(&["-smp", &format!("{},sockets=1,cores={},threads=1", spec.cpus, spec.cpus)]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);
    push(&["-rtc", &format!("base={},clock=vm", rtc_base(spec.clock))]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    push(&["-action", "panic=none"]);
    let egress = plan.egress.as_ref().filter(|_| plan.network == Network::Egress);
    if plan.sandbox {
        push(&["-sandbox", if egress.is_some() { SANDBOX_EGRESS } else { SANDBOX }]);
    }
    push(&["-chardev", &format!("socket,id=serial0,path={},server=off", p(&plan.serial_socket))]);
    push(&["-serial", "chardev:serial0"]);
    push(&["-chardev", &format!("socket,id=qmp,path={},server=on,wait=off", p(&plan.qmp_socket))]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&["-kernel", &p(&plan.kernel), "-initrd", &p(&plan.initrd), "-append", &kernel_cmdline()]);
    push(&["-add-fd", &format!("fd={},set=1,opaque=reprovm-bundle", plan.bundle_fd)]);
    push(&["-blockdev", "driver=file,node-name=bundle,filename=/dev/fdset/1,read-only=on"]);
    push(&[
        "-blockdev",
        &format!("driver=raw,node-name=base,file=bundle,offset={},size={},read-only=on", plan.rootfs.offset, plan.rootfs.size),
    ]);
    push(&["-blockdev", &format!("driver=file,node-name=overlay-file,filename={}", p(&plan.overlay))]);
    push(&["-blockdev", "driver=qcow2,node-name=root,file=overlay-file,backing=base"]);
    // A full host disk is an I/O error in the guest (the build fails and
    // says so), never a VM paused forever (QEMU's default for ENOSPC).
    push(&["-device", "virtio-blk-pci,drive=root,werror=report,rerror=report"]);
    // Scratch and output disks: written once and thrown away, so the
    // guest's flushes need not reach the host's disk.
    for (i, disk) in plan.disks.iter().enumerate() {
        push(&["-blockdev", &format!("driver=file,node-name=disk{i}-file,filename={},cache.no-flush=on", p(&disk.path))]);
        push(&["-blockdev", &format!("driver=raw,node-name=disk{i},file=disk{i}-file")]);
        push(&["-device", &format!("virtio-blk-pci,drive=disk{i},serial={},werror=report,rerror=report", disk.serial)]);
    }
    let restrict = match plan.network {
        Network::None | Network::Egress => "on",
        Network::Nat => "off",
    };
    let guestfwd = egress.map(|relay| format!(",{}", relay.guestfwd())).unwrap_or_default();
    push(&["-netdev", &format!("user,id=net0,restrict={restrict},hostfwd=tcp:127.0.0.1:{}-:22{guestfwd}", plan.ssh_port)]);
    push(&["-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"]);
    push(&["-device", "pvpanic"]);
    // Without a hardware RNG a Nehalem guest's kernel takes seconds to seed
    // its CRNG, and sshd waits for it.
    push(&["-device", "virtio-rng-pci"]);
    for (name, path) in &plan.fw_cfg {
        push(&["-fw_cfg", &format!("name={FW_CFG_DIR}/{name},file={}", p(path))]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(accel: Accelerator) -> LaunchPlan {
        let run = PathBuf::from("/tmp/reprovm-run-X");
        LaunchPlan {
            spec: MachineSpec { cpu_model: "Nehalem-v1".into(), cpus: 2, memory_mib: 2048, clock: 1_732_492_800 },
            accel,
            bundle_fd: 7,
            rootfs: Extent { offset: 71680, size: 1048576 },
            overlay: run.join("overlay.qcow2"),
            kernel: run.join("vmlinux"),
            initrd: run.join("initrd.img"),
            qmp_socket: run.join("qmp.sock"),
            serial_socket: run.join("serial.sock"),
            ssh_port: 40022,
            fw_cfg: vec![("authorized_keys".into(), run.join("authorized_keys"))],
            disks: vec![],
            network: Network::None,
            egress: None,
            sandbox: true,
        }
    }

    #[test]
    fn golden_command_line() {
        let args: Vec<String> = qemu_args(&plan(Accelerator::Tcg)).into_iter().map(|a| a.into_string().unwrap()).collect();
        let expected = [
            "-name reprovm-builder",
            "-machine pc-q35-7.2,accel=tcg",
            "-cpu Nehalem-v1,vendor=GenuineIntel,enforce,level=31,vme=off,x2apic=off,pmu=off,kvm=off,tcg-cpuid=off,hypervisor=on",
            "-smp 2,sockets=1,cores=2,threads=1",
            "-m 2048M",
            "-rtc base=2024-11-25T00:00:00,clock=vm",
            "-nodefaults -no-user-config -display none -no-reboot",
            "-action panic=none",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-chardev socket,id=serial0,path=/tmp/reprovm-run-X/serial.sock,server=off",
            "-serial chardev:serial0",
            "-chardev socket,id=qmp,path=/tmp/reprovm-run-X/qmp.sock,server=on,wait=off",
            "-mon chardev=qmp,mode=control",
            &format!("-kernel /tmp/reprovm-run-X/vmlinux -initrd /tmp/reprovm-run-X/initrd.img -append {}", kernel_cmdline()),
            "-add-fd fd=7,set=1,opaque=reprovm-bundle",
            "-blockdev driver=file,node-name=bundle,filename=/dev/fdset/1,read-only=on",
            "-blockdev driver=raw,node-name=base,file=bundle,offset=71680,size=1048576,read-only=on",
            "-blockdev driver=file,node-name=overlay-file,filename=/tmp/reprovm-run-X/overlay.qcow2",
            "-blockdev driver=qcow2,node-name=root,file=overlay-file,backing=base",
            "-device virtio-blk-pci,drive=root,werror=report,rerror=report",
            "-netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22",
            "-device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
            "-device pvpanic",
            "-device virtio-rng-pci",
            "-fw_cfg name=opt/reprovm/authorized_keys,file=/tmp/reprovm-run-X/authorized_keys",
        ]
        .join(" ");
        assert_eq!(args.join(" "), expected);
    }

    #[test]
    fn accelerator_changes_only_the_machine_option() {
        let tcg = qemu_args(&plan(Accelerator::Tcg));
        let kvm = qemu_args(&plan(Accelerator::Kvm));
        let differing: Vec<_> = tcg.iter().zip(&kvm).filter(|(a, b)| a != b).collect();
        assert_eq!(differing.len(), 1);
        assert_eq!(differing[0].1, "pc-q35-7.2,accel=kvm");
    }

    #[test]
    fn extra_disks_follow_the_root_and_nat_lifts_the_restriction() {
        let mut plan = plan(Accelerator::Tcg);
        plan.disks = vec![ExtraDisk { path: "/tmp/b/scratch.img".into(), serial: "reprovm-scratch".into() }];
        plan.network = Network::Nat;
        let args: Vec<String> = qemu_args(&plan).into_iter().map(|a| a.into_string().unwrap()).collect();
        let line = args.join(" ");
        let root = line.find("virtio-blk-pci,drive=root").unwrap();
        let scratch = line.find("-blockdev driver=file,node-name=disk0-file,filename=/tmp/b/scratch.img,cache.no-flush=on -blockdev driver=raw,node-name=disk0,file=disk0-file -device virtio-blk-pci,drive=disk0,serial=reprovm-scratch,werror=report,rerror=report").unwrap();
        assert!(root < scratch);
        assert!(line.contains("user,id=net0,restrict=off,hostfwd=tcp:127.0.0.1:40022-:22"));
    }

    #[test]
    fn egress_keeps_the_restriction_and_forwards_only_the_proxy_address_to_the_relay() {
        let mut plan = plan(Accelerator::Tcg);
        plan.network = Network::Egress;
        plan.egress = Some(EgressRelay { program: "/opt/re provm,x/reprovm".into(), socket: "/tmp/reprovm-build-X/egress.sock".into() });
        let args: Vec<String> = qemu_args(&plan).into_iter().map(|a| a.into_string().unwrap()).collect();
        let netdev = args.iter().skip_while(|a| *a != "-netdev").nth(1).unwrap();
        assert_eq!(
            netdev,
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22,guestfwd=tcp:10.0.2.100:3128-cmd:'/opt/re provm,,x/reprovm' egress-relay /tmp/reprovm-build-X/egress.sock"
        );
        let sandbox = args.iter().skip_while(|a| *a != "-sandbox").nth(1).unwrap();
        assert_eq!(sandbox, SANDBOX_EGRESS, "QEMU may start the relay");
        plan.network = Network::None;
        let line = qemu_args(&plan).into_iter().map(|a| a.into_string().unwrap()).collect::<Vec<_>>().join(" ");
        assert!(!line.contains("guestfwd") && line.contains(SANDBOX), "no relay without egress: {line}");
    }

    #[test]
    fn never_host_or_max_cpu() {
        let args = qemu_args(&plan(Accelerator::Kvm));
        let cpu = args.iter().skip_while(|a| *a != "-cpu").nth(1).unwrap().to_str().unwrap();
        assert!(!cpu.starts_with("host") && !cpu.starts_with("max") && cpu.contains("enforce"));
        assert!(cpu.contains("vendor=GenuineIntel"), "the vendor is pinned, never the host's: {cpu}");
    }

    #[test]
    fn every_model_keeps_its_own_vendor() {
        for (model, vendor) in [
            ("Nehalem-v1", "GenuineIntel"),
            ("Westmere-v1", "GenuineIntel"),
            ("kvm64", "GenuineIntel"),
            ("EPYC-v1", "AuthenticAMD"),
            ("Opteron_G3", "AuthenticAMD"),
            ("qemu64", "AuthenticAMD"),
            ("Dhyana", "HygonGenuine"),
        ] {
            assert_eq!(model_vendor(model), vendor, "{model}");
        }
    }
}
