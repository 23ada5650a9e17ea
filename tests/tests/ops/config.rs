//! Start-up fails fast with a message naming the bad setting; secrets come
//! from the environment or `*_FILE`, never from flags or built-in defaults
//! (issue 13, safe defaults). The process-level tests run the built
//! binaries (`cargo build --bins` first).

use clap::Parser as _;
use fleet_tests::harness::fixture;
use shared::secret::Secret;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

fn worker_args(extra: &[&str]) -> Vec<String> {
    let prices = fixture("prices.toml");
    let mut args: Vec<String> =
        ["worker", "--prices-file", prices.to_str().unwrap_or_default(), "--admin-bind", "127.0.0.1:0"]
            .map(str::to_owned)
            .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Builds a worker from `args` with `token` and a good API key; the error text.
async fn start_error(args: Vec<String>, token: &str) -> String {
    match worker::Settings::try_parse_from(args) {
        Err(e) => e.to_string(),
        Ok(mut settings) => {
            settings.bot_token = Secret::new(token);
            settings.anthropic_api_key = Secret::new("sk-ant-test-key");
            match worker::App::build(settings).await {
                Ok(_) => String::new(),
                Err(e) => format!("{e:#}"),
            }
        }
    }
}

#[tokio::test]
async fn a_worker_with_an_unpriced_model_refuses_to_start() {
    let err = start_error(worker_args(&["--model", "gpt-4o"]), "7000000001:TEST").await;
    assert!(err.contains("ANTHROPIC_MODEL"), "{err}");
}

#[tokio::test]
async fn bad_settings_are_named_in_the_start_up_error() {
    let err = start_error(worker_args(&[]), "").await;
    assert!(err.contains("TELEGRAM_BOT_TOKEN"), "{err}");
    let err = start_error(worker_args(&["--visibility-timeout-s", "1"]), "7000000001:TEST").await;
    assert!(err.contains("VISIBILITY_TIMEOUT_S"), "{err}");
    let err = start_error(worker_args(&["--stars-packs", "100"]), "7000000001:TEST").await;
    assert!(err.contains("STARS_PACKS"), "{err}");
    let err = start_error(worker_args(&["--tools", "calculator,teleport"]), "7000000001:TEST").await;
    assert!(err.contains("TOOLS"), "{err}");
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    move |k: &str| map.get(k).cloned()
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// A file holding `text` in a folder of the test's own; the folder is removed on drop.
struct SecretFile(PathBuf);

impl SecretFile {
    fn new(name: &str, text: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("fleet-config-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), text)?;
        Ok(Self(dir.join(name)))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn every_binary_reads_its_secrets_and_database_urls_from_files() -> anyhow::Result<()> {
    let token = SecretFile::new("token", "7000000001:FROM-FILE\n")?;
    let key = SecretFile::new("key", "sk-ant-from-file\n")?;
    let webhook = SecretFile::new("webhook", "webhook-secret-from-file\n")?;
    let admin = SecretFile::new("admin", "sk-ant-admin-from-file\n")?;
    let url = SecretFile::new("url", "postgres://fleet_worker:pw@db:5432/fleet\n")?;

    let env = env_of(&[("TELEGRAM_WEBHOOK_SECRET_FILE", webhook.path()), ("TELEGRAM_BOT_TOKEN_FILE", token.path())]);
    let ingress = ingress::Settings::load_from(os_args(&["ingress"]), &env)?;
    assert_eq!(ingress.webhook_secret.expose(), "webhook-secret-from-file");
    assert_eq!(ingress.bot_token.expose(), "7000000001:FROM-FILE");

    let env = env_of(&[
        ("TELEGRAM_BOT_TOKEN_FILE", token.path()),
        ("ANTHROPIC_API_KEY_FILE", key.path()),
        ("DATABASE_URL_FILE", url.path()),
    ]);
    let worker = worker::Settings::load_from(os_args(&["worker"]), &env)?;
    assert_eq!(worker.bot_token.expose(), "7000000001:FROM-FILE");
    assert_eq!(worker.anthropic_api_key.expose(), "sk-ant-from-file");
    assert_eq!(worker.db.database_url, "postgres://fleet_worker:pw@db:5432/fleet");

    let env = env_of(&[
        ("TELEGRAM_BOT_TOKEN_FILE", token.path()),
        ("ANTHROPIC_ADMIN_API_KEY_FILE", admin.path()),
        ("BILLING_DATABASE_URL_FILE", url.path()),
    ]);
    let billing = billing_worker::Settings::load_from(os_args(&["billing-worker"]), &env)?;
    assert_eq!(billing.bot_token.expose(), "7000000001:FROM-FILE");
    assert_eq!(billing.anthropic_admin_key.as_ref().map(Secret::expose), Some("sk-ant-admin-from-file"));
    assert_eq!(billing.billing_database_url, "postgres://fleet_worker:pw@db:5432/fleet");

    // Every finance subcommand that reads the bot database takes its URL
    // from DATABASE_URL_FILE too, and refuses a password in the flag.
    let env = env_of(&[("DATABASE_URL_FILE", url.path())]);
    for sub in [&["reconcile"][..], &["payment-anomalies"], &["refund-stars", "--charge", "ch_1"]] {
        let args: Vec<&str> = ["billing-worker"].iter().chain(sub).copied().collect();
        let s = billing_worker::Settings::load_from(os_args(&args), &env)?;
        let url = match s.command {
            Some(
                billing_worker::config::Command::Reconcile { bot_database_url, .. }
                | billing_worker::config::Command::PaymentAnomalies { bot_database_url }
                | billing_worker::config::Command::RefundStars { bot_database_url, .. },
            ) => bot_database_url,
            other => anyhow::bail!("{sub:?} parsed as {other:?}"),
        };
        assert_eq!(url.as_deref(), Some("postgres://fleet_worker:pw@db:5432/fleet"), "{sub:?}");
        let mut flagged = args.clone();
        flagged.extend(["--bot-database-url", "postgres://u:pw@db/fleet"]);
        let refused = billing_worker::Settings::load_from(os_args(&flagged), &env_of(&[])).map(|_| ());
        assert!(refused.is_err(), "{sub:?}: a password in --bot-database-url was accepted");
    }

    // Both the variable and its file: ambiguous, refused by name.
    let env = env_of(&[("TELEGRAM_BOT_TOKEN", "7000000001:ENV"), ("TELEGRAM_BOT_TOKEN_FILE", token.path())]);
    let both = worker::Settings::load_from(os_args(&["worker"]), &env).map(|_| ()).map_err(|e| e.to_string());
    assert!(both.as_ref().is_err_and(|e| e.contains("TELEGRAM_BOT_TOKEN_FILE")), "{both:?}");
    Ok(())
}

#[test]
fn secrets_and_urls_with_passwords_given_as_flags_are_refused() {
    let none = env_of(&[]);
    let cases: [(&str, Vec<OsString>, &str); 5] = [
        ("ingress", os_args(&["ingress", "--webhook-secret", "webhook-secret-on-cli"]), "TELEGRAM_WEBHOOK_SECRET"),
        ("worker", os_args(&["worker", "--bot-token=7000000001:CLI"]), "TELEGRAM_BOT_TOKEN"),
        ("worker", os_args(&["worker", "--anthropic-api-key", "sk-ant-cli"]), "ANTHROPIC_API_KEY"),
        ("worker", os_args(&["worker", "--database-url", "postgres://u:pw@h/db"]), "DATABASE_URL"),
        (
            "billing-worker",
            os_args(&["billing-worker", "--anthropic-admin-key", "sk-ant-admin-cli"]),
            "ANTHROPIC_ADMIN_API_KEY",
        ),
    ];
    for (binary, args, var) in cases {
        let err = match binary {
            "ingress" => ingress::Settings::load_from(args, &none).map(|_| ()),
            "worker" => worker::Settings::load_from(args, &none).map(|_| ()),
            _ => billing_worker::Settings::load_from(args, &none).map(|_| ()),
        }
        .map_err(|e| e.to_string());
        assert!(err.as_ref().is_err_and(|e| e.contains(var) && e.contains("ps")), "{binary}: {err:?}");
    }
    // A URL without a password is fine as a flag.
    let ok = worker::Settings::load_from(os_args(&["worker", "--database-url", "postgres://u@h/db"]), &none);
    assert!(ok.is_ok(), "{:?}", ok.err());
}

#[test]
fn admin_servers_listen_on_loopback_by_default() -> anyhow::Result<()> {
    let none = env_of(&[]);
    let ingress = ingress::Settings::load_from(os_args(&["ingress"]), &none)?;
    let worker = worker::Settings::load_from(os_args(&["worker"]), &none)?;
    let billing = billing_worker::Settings::load_from(os_args(&["billing-worker"]), &none)?;
    for (name, addr) in
        [("ingress", ingress.admin_bind), ("worker", worker.admin_bind), ("billing", billing.admin_bind)]
    {
        assert!(addr.ip().is_loopback(), "{name} admin binds {addr}");
    }
    assert_eq!(ingress.admin_bind.port(), 9090);
    assert_ne!(ingress.admin_bind.port(), ingress.bind.port(), "metrics are not on the webhook port");
    Ok(())
}

fn bin(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug")).join(name)
}

/// Runs a built binary with only `env` (and PATH) set; its exit success and stderr.
async fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<(bool, String)> {
    let mut cmd = tokio::process::Command::new(bin(name));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).args(args).kill_on_drop(true);
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{name} did not exit within 20 s"))??;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[tokio::test]
async fn each_binary_refuses_to_start_with_a_missing_or_placeholder_secret_naming_it() -> anyhow::Result<()> {
    let base = [("INGRESS_BIND", "127.0.0.1:0"), ("ADMIN_BIND", "127.0.0.1:0"), ("LOG_FORMAT", "json")];
    let good_worker = [("TELEGRAM_BOT_TOKEN", "7000000001:TEST"), ("ANTHROPIC_API_KEY", "sk-ant-test-key")];
    let prices = fixture("prices.toml");
    let prices = prices.to_str().unwrap_or_default();
    // (binary, its secrets, the variable the error must name)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("ingress", vec![], "TELEGRAM_WEBHOOK_SECRET"),
        ("ingress", vec![("TELEGRAM_WEBHOOK_SECRET", "change-me-webhook-secret")], "TELEGRAM_WEBHOOK_SECRET"),
        ("ingress", vec![("TELEGRAM_WEBHOOK_SECRET", "short")], "TELEGRAM_WEBHOOK_SECRET"),
        ("worker", vec![("ANTHROPIC_API_KEY", "sk-ant-test-key")], "TELEGRAM_BOT_TOKEN"),
        ("worker", vec![("TELEGRAM_BOT_TOKEN", "7000000001:SIM"), good_worker[1]], "TELEGRAM_BOT_TOKEN"),
        ("worker", vec![good_worker[0], ("ANTHROPIC_API_KEY", "sim-key")], "ANTHROPIC_API_KEY"),
        ("worker", vec![good_worker[0]], "ANTHROPIC_API_KEY"),
        ("billing-worker", vec![("TELEGRAM_BOT_TOKEN", "7000000001:SIM")], "TELEGRAM_BOT_TOKEN"),
        ("billing-worker", vec![("ANTHROPIC_ADMIN_API_KEY", "change-me-admin-key")], "ANTHROPIC_ADMIN_API_KEY"),
    ];
    for (name, secrets, var) in cases {
        let mut env: Vec<(&str, &str)> = base.to_vec();
        env.push(("PRICES_FILE", prices));
        env.extend(secrets.iter().copied());
        let (ok, stderr) = run(name, &[], &env).await?;
        assert!(!ok, "{name} started with {secrets:?}");
        assert!(stderr.contains(var), "{name} with {secrets:?}: the error names {var}: {stderr}");
        for (_, value) in &secrets {
            assert!(!stderr.contains(value) || value.len() < 8, "{name} printed the secret: {stderr}");
        }
    }
    // And as flags, at the command line itself.
    let (ok, stderr) = run("worker", &["--bot-token", "7000000001:CLI"], &base).await?;
    assert!(!ok && stderr.contains("TELEGRAM_BOT_TOKEN") && stderr.contains("ps"), "{stderr}");
    Ok(())
}
