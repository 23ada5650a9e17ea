//! Where secrets come from (issue 13, safe defaults): the environment or a
//! file named by `<VAR>_FILE` (Docker and Kubernetes secrets), never a
//! command-line flag (visible to every user in `ps`), and never a built-in
//! default. [`check`] refuses missing, placeholder and too-short values.
//!
//! Database and broker URLs may carry passwords: they may also come from
//! `<VAR>_FILE`, and a URL with a password is refused as a flag.

use crate::secret::Secret;
use clap::parser::ValueSource;
use clap::ArgMatches;
use std::ffi::OsString;

/// Why a setting could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Neither `VAR` nor `VAR_FILE` is set (or the value is empty).
    #[error("{var} must be set (in the environment, or in a file named by {var}_FILE)")]
    Missing {
        /// The variable.
        var: String,
    },
    /// A placeholder or obviously weak value.
    #[error("{var} is a placeholder or too weak ({why}): set the real value")]
    Placeholder {
        /// The variable.
        var: String,
        /// What is wrong with it.
        why: String,
    },
    /// Both `VAR` and `VAR_FILE` (or a flag and `VAR_FILE`) are set.
    #[error("{var} and {var}_FILE are both set: set one of them")]
    Both {
        /// The variable.
        var: String,
    },
    /// `VAR_FILE` names a file that cannot be read.
    #[error("{var}_FILE: cannot read {path}: {source}")]
    File {
        /// The variable.
        var: String,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A secret given as a command-line flag.
    #[error(
        "{flag} is not accepted: a secret on the command line is visible to every user in `ps`; set {var} or {var}_FILE"
    )]
    Flag {
        /// The flag as given.
        flag: String,
        /// The variable to use instead.
        var: String,
    },
}

/// Reads one variable; `std::env::var` in production, a map in tests.
pub trait Env {
    /// The value of `var`, if set and valid Unicode.
    fn var(&self, var: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, var: &str) -> Option<String> {
        self(var)
    }
}

/// Refuses any of `flags` (long names without `--`, e.g. `bot-token`) in
/// `args`, as `--flag value` or `--flag=value`, naming the variable to use.
///
/// # Errors
/// [`SourceError::Flag`].
pub fn reject_flags(args: &[OsString], flags: &[(&str, &str)]) -> Result<(), SourceError> {
    for arg in args.iter().filter_map(|a| a.to_str()) {
        if arg == "--" {
            break;
        }
        let name = arg.strip_prefix("--").map(|a| a.split('=').next().unwrap_or(a));
        if let Some((flag, var)) = flags.iter().find(|(flag, _)| Some(*flag) == name) {
            return Err(SourceError::Flag { flag: format!("--{flag}"), var: (*var).to_owned() });
        }
    }
    Ok(())
}

/// Largest secret file read, bytes: a token, key or URL is far smaller; a
/// larger file (or `/dev/zero`) is refused, never read whole.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

fn read_file(var: &str, path: &str) -> Result<String, SourceError> {
    use std::io::Read as _;
    let error = |source: std::io::Error| SourceError::File { var: var.to_owned(), path: path.to_owned(), source };
    // Only a regular file (a symlink to one is fine): a FIFO nobody writes
    // would block start-up for ever, a device could be endless.
    let meta = std::fs::metadata(path).map_err(error)?;
    if !meta.is_file() {
        return Err(error(std::io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(error)?.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(error)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(error(std::io::Error::other(format!("larger than {MAX_SECRET_FILE_BYTES} bytes"))));
    }
    let text = String::from_utf8(bytes).map_err(|_| error(std::io::Error::other("not UTF-8")))?;
    // Files written by `echo` or editors end with a newline.
    Ok(text.trim().to_owned())
}

/// The secret in `var`, or in the file `var_FILE` names (trimmed); `None`
/// when neither is set. Whether it is good enough is [`check`]'s job.
///
/// # Errors
/// Both set, or an unreadable file.
pub fn secret(env: &impl Env, var: &str) -> Result<Option<Secret>, SourceError> {
    let file_var = format!("{var}_FILE");
    match (env.var(var), env.var(&file_var)) {
        (Some(_), Some(_)) => Err(SourceError::Both { var: var.to_owned() }),
        (Some(value), None) => Ok(Some(Secret::new(value))),
        (None, Some(path)) => Ok(Some(Secret::new(read_file(var, &path)?))),
        (None, None) => Ok(None),
    }
}

/// Values that were shipped as defaults or in examples, refused everywhere
/// (the old `docker-compose.yml` defaults among them).
const KNOWN_PLACEHOLDERS: [&str; 3] = ["change-me-webhook-secret", "7000000001:SIM", "sim-key"];

/// Fragments that mark a value as a placeholder, compared lowercased.
const PLACEHOLDER_MARKS: [&str; 9] =
    ["change-me", "changeme", "change_me", "replace-me", "replace_me", "placeholder", "your-", "your_", "<"];

/// Refuses an empty, placeholder or shorter-than-`min_len`-characters secret.
///
/// # Errors
/// [`SourceError::Missing`] or [`SourceError::Placeholder`], naming `var`.
pub fn check(var: &str, value: &Secret, min_len: usize) -> Result<(), SourceError> {
    let v = value.expose().trim();
    let refuse = |why: String| Err(SourceError::Placeholder { var: var.to_owned(), why });
    if v.is_empty() {
        return Err(SourceError::Missing { var: var.to_owned() });
    }
    if KNOWN_PLACEHOLDERS.iter().any(|p| p.eq_ignore_ascii_case(v)) {
        return refuse("a value published as a default".into());
    }
    let lower = v.to_ascii_lowercase();
    if let Some(mark) = PLACEHOLDER_MARKS.iter().find(|m| lower.contains(*m)) {
        return refuse(format!("contains {mark:?}"));
    }
    if v.chars().count() < min_len {
        return refuse(format!("shorter than {min_len} characters"));
    }
    Ok(())
}

/// Reads a URL setting from `var_FILE` when that is set, and refuses a URL
/// carrying a password that was given as a flag. `id` is the clap id of the
/// field (its name), `value` the parsed field.
///
/// # Errors
/// Flag with a password, file and another source both set, unreadable file.
pub fn url(env: &impl Env, matches: &ArgMatches, id: &str, var: &str, value: &mut String) -> Result<(), SourceError> {
    let source = matches.value_source(id);
    if source == Some(ValueSource::CommandLine) && has_password(value) {
        return Err(SourceError::Flag { flag: format!("--{}", id.replace('_', "-")), var: var.to_owned() });
    }
    if let Some(path) = env.var(&format!("{var}_FILE")) {
        if matches!(source, Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            return Err(SourceError::Both { var: var.to_owned() });
        }
        *value = read_file(var, &path)?;
    }
    Ok(())
}

/// True when a URL carries a non-empty password: in its userinfo
/// (`scheme://user:password@host`) or as a `password=` query parameter
/// (libpq's connection URIs accept one, and so does sqlx).
pub fn has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let in_userinfo = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .is_some_and(|(_, pw)| !pw.is_empty());
    let query = rest.split_once('?').map(|(_, q)| q.split('#').next().unwrap_or_default()).unwrap_or_default();
    let in_query = query
        .split('&')
        .any(|pair| pair.split_once('=').is_some_and(|(k, v)| k.eq_ignore_ascii_case("password") && !v.is_empty()));
    in_userinfo || in_query
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Env {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn the_old_compose_defaults_and_obvious_placeholders_are_refused() {
        for bad in ["change-me-webhook-secret", "7000000001:SIM", "sim-key", "change-me-please-1234", "<your token>"] {
            let e = check("TELEGRAM_WEBHOOK_SECRET", &Secret::new(bad), 16);
            assert!(matches!(e, Err(SourceError::Placeholder { .. })), "{bad}: {e:?}");
        }
        let short = check("ANTHROPIC_API_KEY", &Secret::new("abc"), 8).map_err(|e| e.to_string());
        assert_eq!(
            short,
            Err("ANTHROPIC_API_KEY is a placeholder or too weak (shorter than 8 characters): set the real value".into())
        );
        let empty = check("TELEGRAM_BOT_TOKEN", &Secret::new(""), 8).map_err(|e| e.to_string());
        assert_eq!(
            empty,
            Err("TELEGRAM_BOT_TOKEN must be set (in the environment, or in a file named by TELEGRAM_BOT_TOKEN_FILE)"
                .into())
        );
        assert!(check("TELEGRAM_BOT_TOKEN", &Secret::new("7000000001:TEST"), 8).is_ok());
    }

    #[test]
    fn a_secret_comes_from_its_file_trimmed_and_not_from_both_places() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("fleet-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("token");
        std::fs::write(&path, "7000000001:FROMFILE\n")?;
        let p = path.to_string_lossy().into_owned();
        let from_file = secret(&env(&[("TELEGRAM_BOT_TOKEN_FILE", &p)]), "TELEGRAM_BOT_TOKEN")?;
        assert_eq!(from_file.as_ref().map(Secret::expose), Some("7000000001:FROMFILE"));
        let both = secret(&env(&[("TELEGRAM_BOT_TOKEN", "x"), ("TELEGRAM_BOT_TOKEN_FILE", &p)]), "TELEGRAM_BOT_TOKEN");
        assert!(matches!(both, Err(SourceError::Both { .. })), "{both:?}");
        let missing = secret(&env(&[("TELEGRAM_BOT_TOKEN_FILE", "/nonexistent/x")]), "TELEGRAM_BOT_TOKEN");
        assert!(matches!(missing, Err(SourceError::File { .. })), "{missing:?}");
        assert!(secret(&env(&[]), "TELEGRAM_BOT_TOKEN")?.is_none());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn secret_flags_are_refused_in_both_spellings() {
        let flags = [("bot-token", "TELEGRAM_BOT_TOKEN")];
        for args in [["worker", "--bot-token", "x"].as_slice(), ["worker", "--bot-token=x"].as_slice()] {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            let e = reject_flags(&args, &flags).map_err(|e| e.to_string());
            assert!(
                e.as_ref().is_err_and(|m| m.contains("--bot-token") && m.contains("TELEGRAM_BOT_TOKEN_FILE")),
                "{e:?}"
            );
        }
        let ok: Vec<OsString> = ["worker", "--bot-username", "x"].iter().map(OsString::from).collect();
        assert!(reject_flags(&ok, &flags).is_ok());
    }

    #[test]
    fn passwords_in_urls_are_recognised() {
        assert!(has_password("postgres://fleet_worker:s3cret@db:5432/fleet"));
        assert!(has_password("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert!(!has_password("postgres://postgres@127.0.0.1:5432/fleet"));
        assert!(!has_password("postgres://127.0.0.1/x?user=a"));
        assert!(has_password("postgres://fleet_worker@db/fleet?sslmode=disable&password=hunter2"));
        assert!(!has_password("not a url"));
    }
}
