//! VM integration tests: a real QEMU booting the real builder image under
//! TCG (or KVM where it works). They are `#[ignore]`d so a plain `cargo test`
//! reports them as skipped; scripts/test runs them with --include-ignored
//! once it has a builder image (REPROVM_TEST_IMAGE).

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{assert_nothing_left, reprovm_vm, signal, spawn_with_stderr_lines, test_image, text, wait_for_line, Spawned, TestEnv};
use reprovm::guest::{FirstContact, GuestError, GuestSession, RunKeys};
use reprovm::image::Store;
use reprovm::vm::{AccelChoice, BootOptions, Machine, MachineSpec, Network};

/// Spawns `reprovm run` with its stderr lines sent to the returned channel.
fn spawn_run(env: &TestEnv, command: &[&str]) -> (Spawned, mpsc::Receiver<String>) {
    spawn_with_stderr_lines(reprovm_vm(&env.tmp).args(["run", "--accel", "tcg", "--"]).args(command))
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn sigint_during_a_command_exits_130_and_leaves_nothing() {
    let env = TestEnv::new();
    let (mut child, rx) = spawn_run(&env, &["sleep", "600"]);
    wait_for_line(&rx, "builder ready", Duration::from_secs(300));
    std::thread::sleep(Duration::from_secs(3));
    signal(&child, nix::sys::signal::Signal::SIGINT);
    let status = child.wait_within(Duration::from_secs(120));
    assert_eq!(status.code(), Some(130));
    assert_nothing_left(&env, "");
}

/// Whoever read reprovm's stderr is gone (a CI log reader that died, a
/// closed pipe) when SIGTERM comes: reprovm still stops QEMU, cleans up and
/// exits 130 (logging to the dead pipe once made the signal task panic,
/// and reprovm waited forever with QEMU running).
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn sigterm_with_stderr_gone_still_cleans_up() {
    use std::io::BufRead;
    let env = TestEnv::new();
    let mut child = Spawned::new(
        reprovm_vm(&env.tmp)
            .args(["run", "--accel", "tcg", "--", "sleep", "600"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    );
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("builder ready") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "reprovm ended before the builder was ready");
    }
    drop(stderr);
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    // Within 30 s of SIGTERM, with its stderr gone.
    assert_eq!(child.wait_within(Duration::from_secs(30)).code(), Some(130));
    assert_nothing_left(&env, "");
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn sigterm_during_boot_exits_130_and_leaves_nothing() {
    let env = TestEnv::new();
    let (mut child, rx) = spawn_with_stderr_lines(reprovm_vm(&env.tmp).args(["-v", "run", "--accel", "tcg", "--", "true"]));
    // QEMU starts (the image is hashed meanwhile): interrupt while it boots.
    wait_for_line(&rx, "spawning QEMU", Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait_within(Duration::from_secs(120));
    assert_eq!(status.code(), Some(130));
    assert_nothing_left(&env, "");
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn forced_kvm_boots_or_fails_clearly_with_exit_4() {
    let env = TestEnv::new();
    let start = Instant::now();
    let (out, err, code) = text(&reprovm_vm(&env.tmp).args(["run", "--accel", "kvm", "--", "nproc"]).output().unwrap());
    match code {
        0 => assert_eq!(out.trim(), "2"),
        4 => assert!(err.contains("KVM cannot be used"), "{err}"),
        other => panic!("--accel kvm exited {other}: {err}"),
    }
    assert!(start.elapsed() < Duration::from_secs(120), "a KVM that cannot boot must be detected by the watchdog");
    assert_nothing_left(&env, "");
}

#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn a_tcg_boot_whose_console_stops_is_started_once_more() {
    let env = TestEnv::new();
    // The first QEMU starts with its vCPUs stopped (-S): a guest whose
    // console never moves, as in the rare early-boot stall under TCG.
    let qemu = env.path().join("qemu-stalls-once");
    std::fs::write(
        &qemu,
        "#!/bin/sh\nif mkdir \"$0.started\" 2>/dev/null; then exec qemu-system-x86_64 \"$@\" -S; fi\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let start = Instant::now();
    let (out, err, code) = text(
        &reprovm_vm(&env.tmp)
            .arg("run")
            .args(["--accel", "tcg", "--boot-timeout", "120", "--qemu"])
            .arg(&qemu)
            .args(["--", "sh", "-c", "echo up; exit 7"])
            .output()
            .unwrap(),
    );
    // The command's exit status comes back through the restart.
    assert_eq!((code, out.trim()), (7, "up"), "{err}");
    assert!(err.contains("hung early in its boot under TCG") && err.contains("starting it once more"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(90), "the stall is noticed after 20 s of silence, not at the boot's limit");
    assert_nothing_left(&env, "");
}

/// Boots the test image through the library under TCG with `cpus` and
/// `memory_mib`, keeping per-run files in `env`'s TMPDIR.
async fn boot_test_machine(env: &TestEnv, cpus: u32, memory_mib: u32) -> Machine {
    let (pin, cache) = test_image();
    let (image, check) = Store::at(cache.join("reprovm/images")).open_checking(pin.parse().unwrap()).unwrap();
    let opts = BootOptions {
        spec: MachineSpec { cpu_model: "Nehalem-v1".into(), cpus, memory_mib, clock: 1_700_000_000 },
        accel: AccelChoice::Tcg,
        qemu: "qemu-system-x86_64".into(),
        boot_timeout: Duration::from_secs(300),
        runtime_dir: env.tmp.clone(),
        disks: Vec::new(),
        network: Network::None,
        egress: None,
        log_limit: 64 << 20,
    };
    Machine::boot(&image, check, &opts).await.unwrap()
}

/// Runs `command` as root over the machine's session; its status, stdout
/// and stderr.
async fn exec_capture(machine: &mut Machine, command: &'static str) -> (i32, String, String) {
    machine.with_session(move |session| session.exec_capture(command)).await.unwrap()
}

/// One booted builder shared by several checks: QMP against the real QEMU,
/// the host-key check, the guest facts, and the stop.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn one_builder_qmp_host_key_facts_and_stop() {
    let env = TestEnv::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut machine = boot_test_machine(&env, 2, 1024).await;
        // QMP commands used by reprovm, against the real QEMU.
        let (running, state) = machine.qmp().status().await.unwrap();
        assert!(running && state == "running", "{state}");
        assert!(machine.qmp().version().await.unwrap().starts_with(char::is_numeric));
        // The pinned machine as the guest sees it, and its clock checked.
        let started = machine.qemu_started;
        let contact = machine.with_session(move |session| FirstContact::take(session, 1_700_000_000, started)).await.unwrap();
        let facts = &contact.facts;
        assert_eq!(facts.nproc, 2);
        assert_eq!(facts.hostname, "builder");
        assert!(facts.cpu_model.contains("Nehalem"), "{}", facts.cpu_model);
        assert!(contact.clock >= 1_700_000_000 && contact.clock < 1_700_000_000 + 600);
        assert!(facts.memory_kib > 900_000 && facts.memory_kib <= 1024 * 1024);
        // Only the host key made for this run is accepted.
        let port = machine.ssh_port();
        let impostor_view =
            tokio::task::spawn_blocking(move || GuestSession::connect(port, &RunKeys::generate().unwrap(), Duration::from_secs(2)))
                .await
                .unwrap();
        assert!(matches!(impostor_view, Err(GuestError::HostKeyMismatch { .. })), "a different host key must be refused");
        // The session of this run works and runs commands as root.
        let (status, out, _) = exec_capture(&mut machine, "id -un; ls -ld /run/reprovm").await;
        assert_eq!(status, 0);
        assert!(out.starts_with("root\n"), "{out}");
        // The facts, read with bash's builtins, are what the programs say.
        let (status, programs, _) =
            exec_capture(&mut machine, "uname -a; nproc; hostname; date -u +%s; cat /proc/meminfo /proc/cpuinfo").await;
        let by_programs = reprovm::guest::GuestFacts::parse(status, &programs).unwrap();
        assert_eq!(by_programs.facts, contact.facts, "the facts as uname, nproc, hostname and cat give them");
        assert!((by_programs.clock - contact.clock).abs() < 60);
        let run_dir = machine.run_dir().to_path_buf();
        let stopping = Instant::now();
        machine.stop(None).await;
        assert!(stopping.elapsed() < Duration::from_secs(2), "QEMU quits at once: {:?}", stopping.elapsed());
        assert!(!run_dir.exists());
    });
    assert_nothing_left(&env, "");
}

/// Every QMP command reprovm sends, against the real QEMU (no guest needed).
#[test]
#[ignore = "starts QEMU: run through scripts/test"]
fn qmp_commands_work_against_the_real_qemu() {
    let env = TestEnv::new();
    let socket = env.tmp.join("qmp.sock");
    let mut qemu = reprovm::process::Supervised::spawn(
        "QEMU",
        std::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display())),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let qmp = reprovm::vm::qmp::Qmp::connect(&socket, Duration::from_secs(10)).await.unwrap();
        let (running, state) = qmp.status().await.unwrap();
        assert!(!running && state == "prelaunch", "{state}");
        assert!(qmp.version().await.unwrap().starts_with(char::is_numeric));
        qmp.quit().await.unwrap();
    });
    assert!(qemu.wait_for(Duration::from_secs(10)).unwrap().is_some(), "QEMU must exit on quit");
}

/// A kernel panic in the guest is reported as such (pvpanic → GUEST_PANICKED,
/// or the serial console), and the machine still cleans up.
#[test]
#[ignore = "boots a VM: run through scripts/test"]
fn a_guest_kernel_panic_is_reported() {
    let env = TestEnv::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut machine = boot_test_machine(&env, 1, 512).await;
        let session = machine.take_session().unwrap();
        // The SSH command never returns normally: the kernel dies under it.
        tokio::task::spawn_blocking(move || {
            let _ = session.exec_capture("echo c > /proc/sysrq-trigger");
        });
        let start = Instant::now();
        let err = loop {
            if let Err(e) = machine.health() {
                break e;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "the panic was not noticed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(matches!(err, reprovm::vm::VmError::Panicked { .. }), "{err}");
        assert!(err.to_string().contains("Kernel panic"), "{err}");
    });
    assert_nothing_left(&env, "");
}
