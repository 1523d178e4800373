//! The commands: each turns its arguments into admin RPCs and describes its
//! results as [`Column`]s for [`Output`].

mod accounts;
mod capture;
mod config;
mod keys;
mod limits;
mod requests;
mod status;
mod tokens;

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use relay_proto::v1::ConfigVersion;

use crate::args::{Cli, Command, SecretSource};
use crate::client;
use crate::output::{Column, Output, Value};

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    if let Command::Completions { shell } = cli.command {
        // Needs no control plane and no token.
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "relayctl", &mut script);
        use std::io::Write;
        return match std::io::stdout().write_all(&script) {
            // `relayctl completions bash | head` is fine.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.context("writing the completion script"),
        };
    }
    let token = client::load_token(cli.token.as_deref(), cli.token_file.as_deref())?;
    let ca = match &cli.ca_file {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read --ca-file {}", p.display()))?),
        None => None,
    };
    let mut conn = client::connect(&cli.server, &token, ca.as_deref())?;
    let out = Output::new(cli.output);
    match cli.command {
        Command::Account(cmd) => accounts::run(&mut conn, out, cmd).await,
        Command::Key(cmd) => keys::run(&mut conn, out, cmd).await,
        Command::Group(cmd) => config::group(&mut conn, out, cmd).await,
        Command::Pricing(cmd) => config::pricing(&mut conn, out, cmd).await,
        Command::Settings(cmd) => config::settings(&mut conn, out, cmd).await,
        Command::Proxies(cmd) => status::proxies(&mut conn, out, cmd).await,
        Command::Audit(args) => status::audit(&mut conn, out, args).await,
        Command::Usage(args) => status::usage(&mut conn, out, args).await,
        Command::Requests(cmd) => requests::run(&mut conn, out, cmd).await,
        Command::Token(cmd) => tokens::run(&mut conn, out, cmd).await,
        Command::Capture(cmd) => capture::run(&mut conn, out, cmd).await,
        Command::Version => status::version(&mut conn, out).await,
        Command::Notify(cmd) => status::notify(&mut conn, out, cmd).await,
        Command::Status => status::status(&mut conn, out).await,
        Command::Completions { .. } => Ok(()),
    }
}

/// `epoch:revision`, or `None` when unset.
pub fn version_string(v: Option<&ConfigVersion>) -> Option<String> {
    v.map(ToString::to_string)
}

/// The result of a delete or revoke that returns only the new config version.
pub struct Deleted {
    pub kind: &'static str,
    pub target: String,
    pub version: Option<ConfigVersion>,
}

const DELETED_COLUMNS: &[Column<Deleted>] = &[
    Column::new("deleted", "Deleted", |d| Value::text(&d.target)),
    Column::new("kind", "Kind", |d| Value::text(d.kind)),
    Column::new("config_version", "Config version", |d| {
        version_string(d.version.as_ref()).map_or(Value::Null, Value::Text)
    }),
];

impl Deleted {
    pub fn print(&self, out: Output, verb: &str) -> Result<()> {
        let version = version_string(self.version.as_ref())
            .map(|v| format!(" (config version {v})"))
            .unwrap_or_default();
        let text = format!("{} {:?} {verb}{version}", self.kind.replace('_', " "), self.target);
        out.one_or_text(DELETED_COLUMNS, self, &text)
    }
}

fn non_empty(text: String, what: &str, origin: &str) -> Result<String> {
    let t = text.trim().to_string();
    if t.is_empty() {
        return Err(anyhow!("the {what} read from {origin} is empty"));
    }
    Ok(t)
}

/// Reads a secret from a file, trimmed; empty is an error. The error names the
/// file, never its contents.
pub fn read_secret_file(path: &Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {what} file {}", path.display()))?;
    non_empty(text, what, &path.display().to_string())
}

/// The upstream credential from `--secret-stdin` / `--secret-file`, if given.
pub fn read_secret(src: &SecretSource) -> Result<Option<String>> {
    const WHAT: &str = "secret";
    if let Some(path) = &src.secret_file {
        return read_secret_file(path, WHAT).map(Some);
    }
    if !src.secret_stdin {
        return Ok(None);
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Paste the secret, then press Enter and Ctrl-D:");
    }
    let mut text = String::new();
    stdin
        .read_to_string(&mut text)
        .context("cannot read the secret from standard input")?;
    non_empty(text, WHAT, "standard input").map(Some)
}

/// Drops blanks from a comma-split list (`--models a,,b`).
pub fn clean_list(items: &[String]) -> Vec<String> {
    items
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "sk-ant-123\n").unwrap();
        let src = SecretSource {
            secret_stdin: false,
            secret_file: Some(f.clone()),
        };
        assert_eq!(read_secret(&src).unwrap().as_deref(), Some("sk-ant-123"));
        std::fs::write(&f, "\n").unwrap();
        let err = read_secret(&src).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let none = SecretSource {
            secret_stdin: false,
            secret_file: None,
        };
        assert_eq!(read_secret(&none).unwrap(), None);
        let missing = SecretSource {
            secret_stdin: false,
            secret_file: Some(dir.path().join("nope")),
        };
        assert!(read_secret(&missing)
            .unwrap_err()
            .to_string()
            .contains("cannot read secret file"));
    }

    #[test]
    fn lists_drop_blanks() {
        assert_eq!(clean_list(&["a".into(), " ".into(), " b ".into()]), ["a", "b"]);
    }
}
