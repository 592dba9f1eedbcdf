//! `reprovm build`, `verify` and `compare`: recipe and flags become a
//! validated [`BuildRequest`], the build runs with progress on stderr (or,
//! with `--progress json`, as JSON lines on stdout), and stdout carries only
//! what a script would read (SHA256SUMS, result.json, the comparison table,
//! the events).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::ProgressBar;

use crate::attest::keys::SigningKey;
use crate::cli::attest::load_record;
use crate::cli::run::resolve_image;
use crate::cli::{name_the_flag, Error, MachineArgs};
use crate::egress::AllowedHost;
use crate::escape::escape;
use crate::image::Store;
use crate::rebuild::artifacts::sha256sums;
use crate::rebuild::compare::{all_identical, compare_rows, differing_inputs, render_inputs, render_rows, Status};
use crate::rebuild::recipe::{MachineSection, NetworkAccess};
use crate::rebuild::{rebuild, BuildRecipe, BuildRequest, BuildResult, EgressRequest, Progress, Record, Stage, BUILD_RECIPE_FILE};
use crate::terminal;
use crate::vm::Network;
use crate::Exit;

/// What to build, where, and overrides of the recipe.
#[derive(Clone, Debug, clap::Args)]
pub struct BuildArgs {
    /// The source directory.
    #[arg(default_value = ".", value_name = "SRC")]
    pub src: PathBuf,
    /// The recipe [default: SRC/reprovm.toml].
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Output directory [default: SRC/out]; replaced only if empty or an earlier reprovm output.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Image and machine (override the recipe).
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Scratch disk in MiB (overrides machine.scratch_mib).
    #[arg(long, value_name = "MIB")]
    pub scratch: Option<u64>,
    /// Network during the build (overrides build.network). A recipe's
    /// `network = "nat"` needs `--network nat`: only the user can grant it.
    #[arg(long, value_enum)]
    pub network: Option<Network>,
    /// Also let the build reach HOST[:PORT] through the egress proxy, even
    /// where it is this host or its private network (a recipe's allow list
    /// never reaches those); repeatable. Implies the egress proxy.
    #[arg(long = "allow", value_name = "HOST[:PORT]")]
    pub allow: Vec<String>,
    /// Answer the build's downloads from those recorded in this result.json
    /// (and the download cache), with no network at all.
    #[arg(long, value_name = "RESULT")]
    pub replay: Option<PathBuf>,
    /// With --replay: fetch a recorded download missing from the cache from
    /// its recorded URL (it must have its recorded SHA-256).
    #[arg(long, requires = "replay")]
    pub replay_fetch: bool,
    /// Limit for the build in seconds (overrides build.timeout_secs).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print JSON on stdout: `build`, result.json instead of SHA256SUMS;
    /// `verify`, the comparison (as `compare --json`) with the result as
    /// `result`, instead of the table.
    #[arg(long)]
    pub json: bool,
    /// How the stages are reported: `human`, a line each on stderr; `json`,
    /// stdout becomes JSON lines written by reprovm alone (stage-begin and
    /// stage-end per stage, then one result or error event, which carries
    /// what --json prints: the two conflict). The build's output stays on
    /// stderr.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = ProgressFormat::Human, conflicts_with = "json")]
    pub progress: ProgressFormat,
    /// Sign the provenance with this OpenSSH Ed25519 private key
    /// (provenance.intoto.dsse.json); an encrypted key is opened with
    /// REPROVM_KEY_PASSPHRASE or a terminal prompt, before the build starts.
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
}

/// How a build reports its stages (`--progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressFormat {
    /// A line per stage on stderr, with a spinner on a terminal.
    Human,
    /// JSON lines on stdout, written by reprovm alone.
    Json,
}

/// Stage lines on stderr, with a spinner while a stage runs on a terminal;
/// nothing with `--quiet`.
struct StageProgress {
    spinner: Mutex<Option<ProgressBar>>,
}

impl Progress for StageProgress {
    fn begin(&self, stage: Stage, streams_output: bool) {
        let what = stage.what();
        if streams_output {
            terminal::note(format_args!("{what}…"));
            return;
        }
        *self.spinner.lock().expect("spinner lock") = Some(terminal::spinner(&format!("{what}…")));
    }

    fn end(&self, _: Stage, summary: &str, took: Duration) {
        if let Some(bar) = self.spinner.lock().expect("spinner lock").take() {
            bar.finish_and_clear();
        }
        terminal::note(format_args!("{summary} ({:.1}s)", took.as_secs_f64()));
    }

    fn bar(&self) -> ProgressBar {
        self.spinner.lock().expect("spinner lock").clone().unwrap_or_else(ProgressBar::hidden)
    }
}

/// One event of the `--progress json` stream.
#[derive(serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
enum Event<'a> {
    StageBegin {
        stage: &'static str,
        what: &'static str,
    },
    StageEnd {
        stage: &'static str,
        summary: &'a str,
        secs: f64,
    },
    Result {
        exit: u8,
        result: &'a BuildResult,
        /// `verify`: the comparison, as `verify --json` prints it (without
        /// its copy of the result).
        #[serde(skip_serializing_if = "Option::is_none")]
        comparison: Option<&'a serde_json::Value>,
    },
    Error {
        exit: u8,
        message: &'a str,
    },
}

/// The `--progress json` stream: one JSON object per line, each written
/// whole and flushed. Only reprovm writes it (the guest's output goes to
/// stderr); a stream that cannot be written (a reader that went away)
/// does not stop the build or its clean-up.
pub struct Events<W: Write + Send> {
    out: Mutex<W>,
}

impl Events<io::Stdout> {
    /// The stream on stdout.
    pub fn stdout() -> Self {
        Events::new(io::stdout())
    }
}

impl<W: Write + Send> Events<W> {
    fn new(out: W) -> Self {
        Events { out: Mutex::new(out) }
    }

    fn emit(&self, event: &Event) {
        let line = serde_json::to_string(event).expect("an event serializes") + "\n";
        let mut out = self.out.lock().expect("events lock");
        let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
    }

    /// The last event of a command that failed: its exit code and its
    /// error chain, escaped as on stderr.
    pub fn error(&self, exit: u8, message: &str) {
        self.emit(&Event::Error { exit, message });
    }

    /// The last event of a build that finished (`verify`: exit 0 or 1, and
    /// the comparison).
    fn result(&self, exit: u8, result: &BuildResult, comparison: Option<&serde_json::Value>) {
        self.emit(&Event::Result { exit, result, comparison });
    }
}

impl<W: Write + Send> Progress for Events<W> {
    fn begin(&self, stage: Stage, _: bool) {
        self.emit(&Event::StageBegin { stage: stage.name(), what: stage.what() });
    }

    fn end(&self, stage: Stage, summary: &str, took: Duration) {
        let secs = (took.as_secs_f64() * 1000.0).round() / 1000.0;
        self.emit(&Event::StageEnd { stage: stage.name(), summary, secs });
    }

    fn bar(&self) -> ProgressBar {
        ProgressBar::hidden()
    }
}

/// Validates the arguments and the recipe into a request.
fn request(args: &BuildArgs) -> Result<BuildRequest, Error> {
    let recipe_file = args.recipe.clone().unwrap_or_else(|| args.src.join(BUILD_RECIPE_FILE));
    // --recipe is the user's choice; SRC/reprovm.toml comes with the tree.
    let mut recipe = match &args.recipe {
        Some(file) => BuildRecipe::load(file)?,
        None => BuildRecipe::load_from_tree(&args.src)?,
    };
    if !args.src.is_dir() {
        return Err(Error::Usage(format!("source directory {} does not exist", args.src.display())));
    }
    let m = &args.machine;
    let flag_set = |field: &str| match field {
        "machine.scratch_mib" => args.scratch.is_some(),
        "build.timeout_secs" => args.timeout.is_some(),
        other => m.sets(other),
    };
    recipe.check_host_limits(&recipe_file, args.network == Some(Network::Nat), flag_set)?;
    recipe.machine = MachineSection { scratch_mib: args.scratch.or(recipe.machine.scratch_mib), ..m.over(&recipe.machine) };
    recipe.build.network = match (args.network, recipe.build.network) {
        (Some(Network::None), _) => NetworkAccess::None,
        (Some(_), _) => NetworkAccess::Nat,
        (None, NetworkAccess::Allow(hosts)) => NetworkAccess::Allow(hosts),
        // --allow and --replay need the egress proxy, with the recipe's
        // allow list when it has one.
        (None, _) if !args.allow.is_empty() || args.replay.is_some() => NetworkAccess::Allow(Vec::new()),
        (None, other) => other,
    };
    let egress = egress_request(args, &recipe.build.network)?;
    recipe.build.timeout_secs = args.timeout.unwrap_or(recipe.build.timeout_secs);
    // The flags' values get the same checks as the file's, and their errors
    // name the flag.
    recipe.validate(&recipe_file).map_err(|e| name_the_flag(e, flag_set))?;

    let store = Store::from_env()?;
    let pin_flag = m.image.clone().or_else(|| recipe.image.pin.clone());
    let image = resolve_image(&store, pin_flag.as_deref(), recipe.image.name.as_deref())?;
    Ok(BuildRequest {
        out: args.out.clone().unwrap_or_else(|| args.src.join("out")),
        source: args.src.clone(),
        recipe_file,
        machine: recipe.machine.resolve(),
        recipe,
        image,
        store,
        qemu: m.qemu.clone(),
        boot_timeout: Duration::from_secs(m.boot_timeout),
        log_limit: m.log_limit << 20,
        egress,
        sign: args.sign.as_deref().map(SigningKey::load).transpose()?,
    })
}

/// `--allow`, `--replay` and `--replay-fetch`, checked against the network.
fn egress_request(args: &BuildArgs, network: &NetworkAccess) -> Result<EgressRequest, Error> {
    if (!args.allow.is_empty() || args.replay.is_some()) && network.machine_network() != Network::Egress {
        return Err(Error::Usage(format!(
            "--allow and --replay use the egress proxy, which --network {} turns off",
            if *network == NetworkAccess::Nat { "nat" } else { "none" }
        )));
    }
    let allow_cli = args
        .allow
        .iter()
        .map(|host| host.parse::<AllowedHost>().map_err(|e| Error::Usage(format!("invalid value for --allow: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // The recipe's list was checked when it was read.
    let allow = match network {
        NetworkAccess::Allow(hosts) => hosts.iter().filter_map(|h| h.parse().ok()).collect(),
        _ => Vec::new(),
    };
    let replay = match &args.replay {
        None => None,
        Some(file) => {
            let record = Record::load(file)?;
            let result = record.result.ok_or_else(|| {
                Error::Usage(format!("--replay {}: a result.json is needed (a SHA256SUMS records no downloads)", file.display()))
            })?;
            Some((file.clone(), result.inputs.downloads))
        }
    };
    Ok(EgressRequest { allow, allow_cli, replay, fetch_missing: args.replay_fetch })
}

async fn run_build(req: BuildRequest, format: ProgressFormat) -> Result<BuildResult, Error> {
    let (out, signed) = (req.out.clone(), req.sign.is_some());
    let result = match format {
        ProgressFormat::Human => rebuild(req, &StageProgress { spinner: Mutex::new(None) }).await?,
        ProgressFormat::Json => rebuild(req, &Events::stdout()).await?,
    };
    let signed = if signed { ", provenance.intoto.dsse.json" } else { "" };
    terminal::note(format_args!(
        "output in {}: {} artifacts, SHA256SUMS, result.json, provenance.intoto.json{signed}, build.log, serial.log",
        out.display(),
        result.outputs.len()
    ));
    Ok(result)
}

/// `reprovm build`.
pub async fn build(args: BuildArgs) -> Result<u8, Error> {
    let result = run_build(request(&args)?, args.progress).await?;
    if args.progress == ProgressFormat::Json {
        Events::stdout().result(Exit::Ok.code(), &result, None);
    } else if args.json {
        println!("{}", serde_json::to_string_pretty(&result).expect("a result serializes"));
    } else {
        print!("{}", sha256sums(&result.outputs));
    }
    Ok(Exit::Ok.code())
}

/// Runs diffoscope on each differing artifact whose expected copy lies
/// beside the expected file; reports go to OUT/diffoscope/. With
/// `--progress json` diffoscope's stdout goes to stderr: stdout is reprovm's.
fn diffoscope_reports(rows: &[crate::rebuild::compare::Row], expected_dir: &Path, out: &Path, format: ProgressFormat) {
    let differing: Vec<&str> = rows.iter().filter(|r| r.status == Status::Differs).map(|r| r.path.as_str()).collect();
    if differing.is_empty() {
        return;
    }
    if Command::new("diffoscope").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        terminal::say(format_args!("(install diffoscope to see what differs inside each artifact)"));
        return;
    }
    for path in differing {
        let expected = expected_dir.join(path);
        if !expected.is_file() {
            terminal::say(format_args!(
                "no diffoscope report for {}: the expected copy {} is not there",
                escape(path),
                escape(&expected.display().to_string())
            ));
            continue;
        }
        let report = out.join("diffoscope").join(format!("{path}.txt"));
        if let Some(parent) = report.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let mut diffoscope = Command::new("diffoscope");
        diffoscope.arg("--text").arg(&report).arg(&expected).arg(out.join(path)).stdin(Stdio::null());
        if format == ProgressFormat::Json {
            diffoscope.stdout(io::stderr());
        }
        let status = diffoscope.status();
        match status {
            Ok(_) => terminal::say(format_args!("diffoscope report for {}: {}", escape(path), report.display())),
            Err(e) => terminal::say(format_args!("diffoscope failed on {}: {e}", escape(path))),
        }
    }
}

/// `reprovm verify`: exit 0 when every artifact is identical, 1 otherwise.
pub async fn verify(args: BuildArgs, expect: PathBuf, diffoscope: bool) -> Result<u8, Error> {
    let expected = load_record(&expect)?;
    let req = request(&args)?;
    if let (Ok(e), Ok(o)) = (std::fs::canonicalize(&expect), std::fs::canonicalize(&req.out)) {
        if e.starts_with(&o) {
            return Err(Error::Usage(format!(
                "--expect {} lies inside the output directory {}, which the build replaces: copy it elsewhere or choose another --out",
                expect.display(),
                req.out.display()
            )));
        }
    }
    let out = req.out.clone();
    let result = run_build(req, args.progress).await?;
    let actual = Record {
        file: out.join("result.json"),
        hashes: result.outputs.iter().map(|a| (a.path.clone(), a.sha256.clone())).collect(),
        result: Some(result.clone()),
    };
    let rows = compare_rows(&[&expected, &actual], true);
    let identical = all_identical(&rows);
    if args.progress == ProgressFormat::Json {
        let report = comparison_json(&[expect.clone(), actual.file.clone()], &rows, &[&expected, &actual]);
        Events::stdout().result(if identical { Exit::Ok } else { Exit::Differ }.code(), &result, Some(&report));
    } else if args.json {
        let mut report = comparison_json(&[expect.clone(), actual.file.clone()], &rows, &[&expected, &actual]);
        report["result"] = serde_json::to_value(&result).expect("a result serializes");
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON values serialize"));
    } else {
        println!("{}", render_rows(&rows, &["expected".into(), "rebuilt".into()]));
    }
    if identical {
        terminal::note(format_args!("all {} artifacts are identical to {}", rows.len(), expect.display()));
        return Ok(Exit::Ok.code());
    }
    let bad = rows.iter().filter(|r| r.status != Status::Identical).count();
    terminal::say(format_args!("{bad} of {} artifacts do not match {}", rows.len(), expect.display()));
    terminal::say_raw(format_args!("{}", render_inputs(&differing_inputs(&[&expected, &actual]), &["expected".into(), "rebuilt".into()])));
    if diffoscope {
        diffoscope_reports(&rows, expect.parent().unwrap_or(Path::new(".")), &out, args.progress);
    } else {
        terminal::note(format_args!(
            "(--diffoscope shows what differs inside each artifact; it opens them on this host, see docs/security.md)"
        ));
    }
    Ok(Exit::Differ.code())
}

/// The `--json` comparison of `compare` and `verify`: the records, whether
/// all are identical, each artifact's status and hashes, differing inputs.
fn comparison_json(files: &[PathBuf], rows: &[crate::rebuild::compare::Row], records: &[&Record]) -> serde_json::Value {
    let inputs: Vec<serde_json::Value> =
        differing_inputs(records).into_iter().map(|(name, values)| serde_json::json!({ "name": name, "values": values })).collect();
    serde_json::json!({
        "records": files,
        "identical": all_identical(rows),
        "artifacts": rows,
        "differing_inputs": inputs,
    })
}

/// `reprovm compare`: exit 0 when all records agree, 1 otherwise.
pub fn compare(files: Vec<PathBuf>, json: bool) -> Result<u8, Error> {
    let records = files.iter().map(|f| load_record(f)).collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&Record> = records.iter().collect();
    if json {
        let rows = compare_rows(&refs, false);
        println!("{}", serde_json::to_string_pretty(&comparison_json(&files, &rows, &refs)).expect("JSON values serialize"));
        return Ok(if all_identical(&rows) { Exit::Ok } else { Exit::Differ }.code());
    }
    let headers: Vec<String> = (1..=records.len()).map(|i| format!("#{i}")).collect();
    for (h, f) in headers.iter().zip(&files) {
        // File names may come from a downloaded directory (a shell glob): escaped.
        println!("{h} = {}", escape(&f.display().to_string()));
    }
    let rows = compare_rows(&refs, false);
    println!("{}", render_rows(&rows, &headers));
    let inputs = render_inputs(&differing_inputs(&refs), &headers);
    if all_identical(&rows) {
        terminal::note(format_args!("all {} artifacts are identical in the {} records", rows.len(), records.len()));
        if !inputs.is_empty() {
            terminal::say_raw(format_args!("(the same bytes from different inputs)\n{inputs}"));
        }
        return Ok(Exit::Ok.code());
    }
    print!("{inputs}");
    if refs.iter().filter(|r| r.result.is_some()).count() < 2 {
        terminal::say(format_args!("(give result.json files to see which recorded inputs differ)"));
    }
    Ok(Exit::Differ.code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::statement::tests::sample_result;

    /// The lines an `Events` on a buffer wrote, each parsed.
    fn lines(events: Events<Vec<u8>>) -> Vec<serde_json::Value> {
        let bytes = events.out.into_inner().unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
    }

    #[test]
    fn a_build_is_one_json_object_per_line_ending_in_its_result() {
        let events = Events::new(Vec::new());
        for stage in [Stage::Source, Stage::Boot, Stage::Build, Stage::Fetch] {
            events.begin(stage, stage == Stage::Build);
            events.end(stage, "done: \"quoted\"\nand a second line", Duration::from_micros(2_314_159));
        }
        let result = sample_result();
        events.result(0, &result, None);
        let lines = lines(events);
        assert_eq!(lines.len(), 9);
        let names: Vec<(&str, &str)> = lines[..8].iter().map(|l| (l["event"].as_str().unwrap(), l["stage"].as_str().unwrap())).collect();
        assert_eq!(
            names,
            [
                ("stage-begin", "source"),
                ("stage-end", "source"),
                ("stage-begin", "boot"),
                ("stage-end", "boot"),
                ("stage-begin", "build"),
                ("stage-end", "build"),
                ("stage-begin", "fetch"),
                ("stage-end", "fetch"),
            ]
        );
        assert_eq!(lines[2], serde_json::json!({ "event": "stage-begin", "stage": "boot", "what": "booting the builder" }));
        assert_eq!(
            lines[3],
            serde_json::json!({ "event": "stage-end", "stage": "boot", "summary": "done: \"quoted\"\nand a second line", "secs": 2.314 })
        );
        assert_eq!(lines[8]["event"], "result");
        assert_eq!(lines[8]["exit"], 0);
        assert_eq!(lines[8]["result"], serde_json::to_value(&result).unwrap(), "the result is result.json's object");
        assert!(lines[8].get("comparison").is_none());
    }

    #[test]
    fn verify_adds_the_comparison_and_a_failure_ends_with_its_code() {
        let events = Events::new(Vec::new());
        let comparison = serde_json::json!({ "identical": false });
        events.result(1, &sample_result(), Some(&comparison));
        events.error(130, "interrupted by SIGINT");
        let lines = lines(events);
        assert_eq!((lines[0]["event"].as_str(), lines[0]["exit"].as_u64()), (Some("result"), Some(1)));
        assert_eq!(lines[0]["comparison"], comparison);
        assert_eq!(lines[1], serde_json::json!({ "event": "error", "exit": 130, "message": "interrupted by SIGINT" }));
    }

    #[test]
    fn a_stream_nobody_reads_any_more_stops_nothing() {
        // A pipe whose reader is gone: every write fails with EPIPE.
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let events = Events::new(std::fs::File::from(writer));
        events.begin(Stage::Source, false);
        events.end(Stage::Source, "source archived", Duration::from_secs(1));
        events.error(4, "QEMU exited");
    }
}
