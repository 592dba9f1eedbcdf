//! `reprovm completions SHELL` and `reprovm man`: shell completions and man
//! pages, generated from the clap definitions (so they never drift from the
//! real command line).

use std::path::Path;

use clap::CommandFactory;

use crate::cli::{Args, Error};
use crate::path_error::path_error;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) {
    clap_complete::generate(shell, &mut Args::command(), "reprovm", &mut std::io::stdout());
}

/// Writes reprovm(1) to stdout, or with `dir` one page per command into it
/// (`reprovm.1`, `reprovm-build.1`, `reprovm-image-list.1`, …).
pub fn man(dir: Option<&Path>) -> Result<(), Error> {
    let command = Args::command();
    match dir {
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .map_err(path_error("write the man page to", Path::new("stdout")))?,
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(path_error("create", dir))?;
            clap_mangen::generate_to(command, dir).map_err(path_error("write the man pages to", dir))?;
        }
    }
    Ok(())
}
