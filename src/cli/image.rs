//! `reprovm image build|import|fetch|list|verify`.

use crate::cli::{parse_pin, Error, ImageCommand};
use crate::escape::escape;
use crate::image::build::{build_image, BuildOptions};
use crate::image::fetch::fetch_image;
use crate::image::recipe::{write_default_recipe, DEFAULT_RECIPE_DIR};
use crate::image::transport::export;
use crate::image::{Store, StoreError, StoredImage};
use crate::path_error::path_error;
use crate::Exit;

/// Runs one `image` subcommand; blocking work goes to a blocking thread.
pub async fn execute(cmd: ImageCommand) -> Result<Exit, Error> {
    tokio::task::spawn_blocking(move || run_blocking(cmd)).await.expect("image command thread panicked")
}

fn run_blocking(cmd: ImageCommand) -> Result<Exit, Error> {
    let store = Store::from_env()?;
    match cmd {
        ImageCommand::Build { recipe_dir, out, mirror } => build(&store, recipe_dir, BuildOptions { out, mirror })?,
        ImageCommand::Import { file, sha256 } => {
            let expected = sha256.as_deref().map(|v| parse_pin("--sha256", v)).transpose()?;
            let image = store.import(&file, expected)?;
            println!("{}", image.pin);
        }
        ImageCommand::Export { pin, out, level } => {
            let pin = parse_pin("PIN", &pin)?;
            let spinner = crate::terminal::spinner("compressing the bundle…");
            let written = export(&store, pin, &out, level);
            spinner.finish_and_clear();
            let (size, bundle) = written?;
            crate::terminal::note(format_args!(
                "{} written: {} ({:.1}% of the bundle's {}); its pin is still {pin}",
                out.display(),
                human_size(size),
                size as f64 * 100.0 / bundle as f64,
                human_size(bundle)
            ));
        }
        ImageCommand::Fetch { url, sha256 } => {
            let expected = parse_pin("--sha256", &sha256)?;
            let image = fetch_image(&url, expected, &store)?;
            println!("{}", image.pin);
        }
        ImageCommand::List { json: true } => {
            println!("{}", serde_json::to_string_pretty(&list_json(&store.list()?)).expect("JSON values serialize"))
        }
        ImageCommand::List { json: false } => print!("{}", list_table(&store.list()?)),
        ImageCommand::Verify { pin } => verify(&store, pin)?,
    }
    Ok(Exit::Ok)
}

/// `image build [DIR]`; without a directory, the built-in default recipe,
/// written out as it lies in reprovm's source.
fn build(store: &Store, recipe_dir: Option<std::path::PathBuf>, opts: BuildOptions) -> Result<(), Error> {
    let built_in;
    let recipe_dir = match recipe_dir {
        Some(dir) => dir,
        None => {
            tracing::info!("building the default image recipe built into reprovm ({DEFAULT_RECIPE_DIR} of its source)");
            built_in = tempfile::tempdir().map_err(path_error("create a directory in", &std::env::temp_dir()))?;
            write_default_recipe(built_in.path())?
        }
    };
    let spinner = crate::terminal::spinner("building the image (mmdebstrap, then the ext4 root and the bundle)…");
    let built = build_image(&recipe_dir, &opts, store);
    spinner.finish_and_clear();
    let image = built?;
    tracing::info!("image {} ({} bytes) is in the store", image.pin, image.size);
    println!("{}", image.pin);
    Ok(())
}

/// `image verify [PIN]`: every image (or the one named) hashed again.
fn verify(store: &Store, pin: Option<String>) -> Result<(), Error> {
    let pins = match pin {
        Some(p) => vec![parse_pin("PIN", &p)?],
        None => store.list()?.into_iter().map(|i| i.pin).collect(),
    };
    let mut corrupt = 0;
    for pin in pins {
        match store.open_verified(pin) {
            Ok(_) => println!("ok       {pin}"),
            Err(e @ StoreError::PinMismatch { .. }) => {
                corrupt += 1;
                println!("CORRUPT  {pin}");
                crate::cli::report(&e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if corrupt > 0 {
        return Err(Error::Corrupt { count: corrupt });
    }
    Ok(())
}

/// `image list --json`: one object per bundle.
fn list_json(images: &[StoredImage]) -> Vec<serde_json::Value> {
    images
        .iter()
        .map(|image| {
            let meta = &image.layout.metadata;
            serde_json::json!({
                "pin": image.pin.to_string(),
                "size": image.size,
                "name": meta.name,
                "distribution": meta.distribution,
                "architecture": meta.architecture,
                "source_date_epoch": meta.source_date_epoch,
            })
        })
        .collect()
}

/// `image list`: the table.
fn list_table(images: &[StoredImage]) -> String {
    let mut out = format!("{:<71}  {:>10}  {:<10}  {:<24}  DISTRIBUTION\n", "PIN", "SIZE", "DATE", "RECIPE");
    for image in images {
        let meta = &image.layout.metadata;
        let date =
            time::OffsetDateTime::from_unix_timestamp(meta.source_date_epoch).map(|d| d.date().to_string()).unwrap_or_else(|_| "?".into());
        out.push_str(&format!(
            "{:<71}  {:>10}  {:<10}  {:<24}  {} {}\n",
            image.pin.to_string(),
            human_size(image.size),
            date,
            // A fetched bundle's metadata is outside text.
            escape(&meta.name),
            escape(&meta.distribution),
            escape(&meta.architecture)
        ));
    }
    out
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}
