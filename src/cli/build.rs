//! `reprovm build`, `verify` and `compare`: recipe and flags become a
//! validated [`BuildRequest`], the build runs with progress on stderr, and
//! stdout carries only what a script would read (SHA256SUMS, result.json,
//! the comparison table).

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
use crate::rebuild::{rebuild, BuildRecipe, BuildRequest, BuildResult, EgressRequest, Progress, Record, BUILD_RECIPE_FILE};
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
    /// Sign the provenance with this OpenSSH Ed25519 private key
    /// (provenance.intoto.dsse.json); an encrypted key is opened with
    /// REPROVM_KEY_PASSPHRASE or a terminal prompt, before the build starts.
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
}

/// Stage lines on stderr, with a spinner while a stage runs on a terminal;
/// nothing with `--quiet`.
struct StageProgress {
    spinner: Mutex<Option<ProgressBar>>,
}

impl Progress for StageProgress {
    fn begin(&self, what: &str, streams_output: bool) {
        if streams_output {
            terminal::note(format_args!("{what}…"));
            return;
        }
        *self.spinner.lock().expect("spinner lock") = Some(terminal::spinner(&format!("{what}…")));
    }

    fn end(&self, summary: &str, took: Duration) {
        if let Some(bar) = self.spinner.lock().expect("spinner lock").take() {
            bar.finish_and_clear();
        }
        terminal::note(format_args!("{summary} ({:.1}s)", took.as_secs_f64()));
    }

    fn bar(&self) -> ProgressBar {
        self.spinner.lock().expect("spinner lock").clone().unwrap_or_else(ProgressBar::hidden)
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

async fn run_build(req: BuildRequest) -> Result<BuildResult, Error> {
    let progress = StageProgress { spinner: Mutex::new(None) };
    let (out, signed) = (req.out.clone(), req.sign.is_some());
    let result = rebuild(req, &progress).await?;
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
    let result = run_build(request(&args)?).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result).expect("a result serializes"));
    } else {
        print!("{}", sha256sums(&result.outputs));
    }
    Ok(Exit::Ok.code())
}

/// Runs diffoscope on each differing artifact whose expected copy lies
/// beside the expected file; reports go to OUT/diffoscope/.
fn diffoscope_reports(rows: &[crate::rebuild::compare::Row], expected_dir: &Path, out: &Path) {
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
        let status = Command::new("diffoscope").arg("--text").arg(&report).arg(&expected).arg(out.join(path)).stdin(Stdio::null()).status();
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
    let result = run_build(req).await?;
    let actual = Record {
        file: out.join("result.json"),
        hashes: result.outputs.iter().map(|a| (a.path.clone(), a.sha256.clone())).collect(),
        result: Some(result.clone()),
    };
    let rows = compare_rows(&[&expected, &actual], true);
    if args.json {
        let mut report = comparison_json(&[expect.clone(), actual.file.clone()], &rows, &[&expected, &actual]);
        report["result"] = serde_json::to_value(&result).expect("a result serializes");
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON values serialize"));
    } else {
        println!("{}", render_rows(&rows, &["expected".into(), "rebuilt".into()]));
    }
    let identical = all_identical(&rows);
    if identical {
        terminal::note(format_args!("all {} artifacts are identical to {}", rows.len(), expect.display()));
        return Ok(Exit::Ok.code());
    }
    let bad = rows.iter().filter(|r| r.status != Status::Identical).count();
    terminal::say(format_args!("{bad} of {} artifacts do not match {}", rows.len(), expect.display()));
    terminal::say_raw(format_args!("{}", render_inputs(&differing_inputs(&[&expected, &actual]), &["expected".into(), "rebuilt".into()])));
    if diffoscope {
        diffoscope_reports(&rows, expect.parent().unwrap_or(Path::new(".")), &out);
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
