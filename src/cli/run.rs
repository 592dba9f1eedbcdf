//! `reprovm run` and `reprovm shell`: boot the verified builder, run one
//! command (or an interactive shell) as the unprivileged build user, in the
//! build's directory with the build's environment (SOURCE_DATE_EPOCH is the
//! machine's clock), tear down.

use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use crate::cli::{name_the_flag, parse_pin, Error, MachineArgs};
use crate::diagnostics::tail_of;
use crate::escape::EscapingWriter;
use crate::guest::contract::{environment, user_command, GuestUser};
use crate::guest::{FirstContact, GuestError, GuestSession};
use crate::image::{OpenImage, Pin, Store};
use crate::rebuild::recipe::{MachineConfig, MachineSection};
use crate::vm::{BootOptions, Machine, Network, VmError};

/// Picks the image: the pin given, else the store's only image (with
/// `name`, when given).
pub fn resolve_image(store: &Store, pin: Option<&str>, name: Option<&str>) -> Result<Pin, Error> {
    if let Some(value) = pin {
        return parse_pin("--image", value);
    }
    let images: Vec<_> = store.list()?.into_iter().filter(|i| name.is_none_or(|n| i.layout.metadata.name == n)).collect();
    let named = name.map(|n| format!(" named {n}")).unwrap_or_default();
    match images.as_slice() {
        [only] => Ok(only.pin),
        [] => Err(Error::NoImage {
            detail: format!("the store ({}) holds no image{named}: run `reprovm image build` first", store.root().display()),
        }),
        many => Err(Error::NoImage {
            detail: format!(
                "the store holds {} images{named}; choose one with --image: {}",
                many.len(),
                many.iter().map(|i| i.pin.to_string()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// The machine flags, checked as a recipe's `[machine]` would be (errors
/// name the flag), with the defaults for the rest.
fn machine_config(args: &MachineArgs) -> Result<MachineConfig, Error> {
    let section = args.over(&MachineSection::default());
    section.validate(Path::new("the command line")).map_err(|e| name_the_flag(e, |field| args.sets(field)))?;
    Ok(section.resolve())
}

/// Boot options for `machine`, the clock defaulting to the image's date.
fn boot_options(args: &MachineArgs, machine: &MachineConfig, image: &OpenImage) -> BootOptions {
    BootOptions {
        spec: machine.spec(machine.clock.unwrap_or(image.stored.layout.metadata.source_date_epoch)),
        accel: machine.accel,
        qemu: args.qemu.clone(),
        boot_timeout: Duration::from_secs(args.boot_timeout),
        runtime_dir: std::env::temp_dir(),
        disks: Vec::new(),
        network: Network::None,
        egress: None,
        log_limit: args.log_limit << 20,
    }
}

/// Boots the builder; returns it and the command line that runs `command`
/// there as the build user, with the build's environment and `extra`.
async fn boot(args: &MachineArgs, command: &str, extra: &[(String, String)]) -> Result<(Machine, String), Error> {
    let machine = machine_config(args)?;
    let store = Store::from_env()?;
    let pin = resolve_image(&store, args.image.as_deref(), None)?;
    // The hash runs while QEMU starts and the kernel boots (Machine::boot
    // waits for it before the first command).
    let (image, check) = tokio::task::spawn_blocking(move || store.open_checking(pin)).await.expect("open thread panicked")?;
    let opts = boot_options(args, &machine, &image);
    let mut machine = Machine::boot(&image, check, &opts).await?;
    // The clock check every build makes, before the user's command.
    let (pinned, started) = (opts.spec.clock, machine.qemu_started);
    machine.with_session(move |session| FirstContact::take(session, pinned, started)).await?;
    Ok((machine, user_command(command, &environment(GuestUser::Build, pinned, extra), GuestUser::Build)))
}

/// Runs `work` with the machine's SSH session on a blocking thread (ssh2
/// blocks), shuts the machine down, and returns the remote exit status.
async fn in_session(
    mut machine: Machine,
    work: impl FnOnce(&GuestSession) -> Result<i32, GuestError> + Send + 'static,
) -> Result<u8, Error> {
    let status =
        machine.with_session(work).await.map_err(|source| VmError::Ssh { serial_tail: tail_of(machine.serial_log(), 30), source })?;
    machine.stop(None).await;
    Ok(u8::try_from(status).unwrap_or(255))
}

/// `reprovm run -- CMD...`: exits with CMD's status.
pub async fn run_command(args: MachineArgs, command: Vec<String>) -> Result<u8, Error> {
    let line = shlex::try_join(command.iter().map(String::as_str)).map_err(|_| Error::BadCommand)?;
    let (machine, line) = boot(&args, &line, &[]).await?;
    in_session(machine, move |session| session.exec(&line, &mut to_terminal(io::stdout()), &mut to_terminal(io::stderr()))).await
}

/// `stream` itself when it goes to a file or a pipe (the guest's bytes
/// as they are), escaped when it is a terminal.
fn to_terminal<W: Write + IsTerminal + Send + 'static>(stream: W) -> Box<dyn Write + Send> {
    if stream.is_terminal() {
        Box::new(EscapingWriter::new(stream))
    } else {
        Box::new(stream)
    }
}

/// Puts the terminal in raw mode until dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enable() -> RawTerminal {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else { return RawTerminal(None) };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal(None);
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(io::stdin().as_fd(), nix::sys::termios::SetArg::TCSANOW, saved);
        }
    }
}

fn terminal_size() -> (u32, u32) {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (u32::from(ws.ws_col), u32::from(ws.ws_row))
    } else {
        (80, 24)
    }
}

/// `reprovm shell`: an interactive bash on a PTY as the build user (the
/// build's environment, and the terminal's TERM).
pub async fn shell(args: MachineArgs) -> Result<u8, Error> {
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    let (machine, line) = boot(&args, "exec bash", &[("TERM".into(), term.clone())]).await?;
    in_session(machine, move |session| {
        let raw = io::stdin().is_terminal().then(RawTerminal::enable);
        let stdin = io::stdin();
        let status = session.exec_on_pty(&line, &term, terminal_size(), stdin.as_fd(), &mut io::stdout());
        drop(raw);
        let _ = io::stdout().flush();
        status
    })
    .await
}
