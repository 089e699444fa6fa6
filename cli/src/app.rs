//! [`App`]: the whole platform — the command line, `serve` with every role, `worker`, the
//! admin commands — with the application's kinds registered beside the built-in ones.

use std::ffi::OsString;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use conveyor_jobs::webhook::endpoint::SealPass;
use conveyor_worker::store::{self, StoreOptions};
use conveyor_worker::{Handler, JobArgs, JobContext, KindOptions, Outcome, Registry, Store};
use serde::de::DeserializeOwned;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command, Role};
use crate::config::{Config, ConfigError, LogFormat};
use crate::{
    backups, bench, commands, config, console, emails, http_targets, input, output, schedules,
    secrets, serve, webhooks,
};

/// The Conveyor platform with the application's kinds: `conveyor` itself is
/// `App::new().run()`.
///
/// ```no_run
/// use conveyor::{App, Handler, JobArgs, JobContext, Outcome};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct SendInvoice {
///     invoice: u64,
/// }
///
/// impl JobArgs for SendInvoice {
///     const KIND: &'static str = "invoice.send";
/// }
///
/// impl Handler for SendInvoice {
///     async fn run(self, _ctx: JobContext) -> anyhow::Result<Outcome> {
///         println!("sending invoice {}", self.invoice);
///         Ok(Outcome::Done)
///     }
/// }
///
/// fn main() -> std::process::ExitCode {
///     App::new().kind::<SendInvoice>().run()
/// }
/// ```
///
/// Every command of `conveyor` works the same in the application's binary (`serve`, `worker`,
/// `enqueue`, `jobs`, …); its workers run the application's kinds, and its enqueues (the CLI's
/// and the API's) refuse args that do not deserialize into a registered kind's args type.
/// A kind registered twice, or under a name that is not a valid kind or that only the
/// platform may enqueue, is refused when the app runs (exit status 2).
pub struct App {
    registry: Registry,
    /// Each typed kind's default queue, to warn when the worker does not run it.
    queues: Vec<(String, String)>,
    /// Registration mistakes, reported by `run`.
    errors: Vec<String>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("kinds", &self.registry.kinds())
            .finish_non_exhaustive()
    }
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    /// The platform with its built-in kinds (`demo.echo`, `demo.sleep`, `demo.fail`, `noop`;
    /// `webhook.deliver` joins them in the worker).
    pub fn new() -> Self {
        let mut registry = Registry::new();
        conveyor_jobs::register_builtin(&mut registry);
        Self {
            registry,
            queues: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Registers a kind whose args type is its own [`Handler`], with the type's defaults.
    pub fn kind<T: Handler>(mut self) -> Self {
        if self.admit(T::KIND) {
            self.registry.kind::<T>();
            self.queues.push((T::KIND.into(), T::QUEUE.into()));
        }
        self
    }

    /// Registers a handler closure for the typed kind `A` with the type's defaults: for args
    /// types defined in a crate the application shares with the services that enqueue them,
    /// and for handlers that need the application's state (a database pool, a client), which
    /// the closure captures.
    pub fn handle<A, F, Fut>(mut self, f: F) -> Self
    where
        A: JobArgs,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
    {
        if self.admit(A::KIND) {
            self.registry.handle(A::kind_options(), f);
            self.queues.push((A::KIND.into(), A::QUEUE.into()));
        }
        self
    }

    /// Registers a handler closure for `kind` with `options`; its args are any type that
    /// deserializes (`serde_json::Value` takes every args).
    pub fn register<A, F, Fut>(mut self, kind: &str, options: KindOptions, f: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(A, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Outcome>> + Send + 'static,
    {
        if self.admit(kind) {
            self.registry.register_with(kind, options, f);
        }
        self
    }

    /// The kinds registered so far, the built-in ones included.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether `kind` may be registered; records why not.
    fn admit(&mut self, kind: &str) -> bool {
        let refusal = if let Err(e) = conveyor_worker::job::check_name("kind", kind) {
            Some(e.to_string())
        } else if conveyor_jobs::RESERVED_KINDS.contains(&kind) {
            Some(format!(
                "kind `{kind}` is the platform's own; give the application's kind another name"
            ))
        } else if self.registry.get(kind).is_some() {
            Some(format!(
                "kind `{kind}` is registered twice (each kind has one handler)"
            ))
        } else {
            None
        };
        match refusal {
            Some(message) => {
                self.errors.push(message);
                false
            }
            None => true,
        }
    }

    /// Parses the process's command line and runs it on a runtime of its own; the exit
    /// status is `conveyor`'s (0 done, 1 failed, 2 bad input).
    pub fn run(self) -> ExitCode {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                errln!("error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(self.run_with(std::env::args_os()))
    }

    /// Runs the command line `args` (the program name first) on the caller's Tokio runtime,
    /// for an application that has one already (e.g. to open its database pool first).
    pub async fn run_with<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = match Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(e) => {
                // --help and --version print to stdout and succeed; usage errors exit 2.
                let _ = e.print();
                return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
            }
        };
        if !self.errors.is_empty() {
            for e in &self.errors {
                errln!("error: {e}");
            }
            return ExitCode::from(2);
        }
        let kinds = Kinds {
            registry: Arc::new(self.registry),
            queues: self.queues,
        };
        match run(cli, kinds).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                errln!("error: {}", report(&e));
                ExitCode::from(exit_status(&e))
            }
        }
    }
}

/// The registered kinds as the commands use them.
struct Kinds {
    registry: Arc<Registry>,
    queues: Vec<(String, String)>,
}

impl Kinds {
    /// Warns about each typed kind whose default queue this process's worker does not run:
    /// its jobs would wait for another worker.
    fn warn_unserved(&self, config: &Config) {
        if !config.serve.roles.contains(&Role::Worker) {
            return;
        }
        for (kind, queue) in &self.queues {
            if !config.worker.queues.iter().any(|q| &q.name == queue) {
                tracing::warn!(
                    kind = %kind,
                    queue = %queue,
                    "kind `{kind}` goes to queue `{queue}` by default, which this worker does not run; \
                     add it with --queues or worker.queues"
                );
            }
        }
    }
}

/// The error and its causes on one line, each said once: many errors repeat their source's
/// text in their own (`database error: connection refused` over `connection refused`), so a
/// cause whose text the error before it already ends with is not said again.
fn report(e: &anyhow::Error) -> String {
    let texts: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let mut parts: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < texts.len() {
        let text = texts[i].as_str();
        // Causes this text already says in full, in its middle, are not said again.
        let mut next = i + 1;
        while texts.get(next).is_some_and(|c| {
            !c.is_empty() && text.contains(c.as_str()) && !text.ends_with(c.as_str())
        }) {
            next += 1;
        }
        // A cause it ends with is said in its own turn.
        let own = match texts.get(next) {
            Some(cause) if !cause.is_empty() && text.ends_with(cause.as_str()) => text
                [..text.len() - cause.len()]
                .trim_end()
                .trim_end_matches(':')
                .trim_end(),
            _ => text,
        };
        if !own.is_empty() && parts.last() != Some(&own) {
            parts.push(own);
        }
        i = next;
    }
    parts.join(": ")
}

/// 2 for a usage, validation or config error (the input is wrong: fix it and run again, as
/// for clap's own errors), or a request for what only the platform may create (a reserved
/// kind, queue or event type); 1 when the operation itself failed.
fn exit_status(e: &anyhow::Error) -> u8 {
    use conveyor_jobs::webhook::WebhookError;
    // Wrong configured secrets keys: fix the config and run again.
    let webhook_input = |e: &WebhookError| {
        matches!(e, WebhookError::Invalid { .. } | WebhookError::Reserved(_)) || e.is_key_config()
    };
    let bad_input = e.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause.is::<input::UsageError>()
            || cause.is::<conveyor_scheduler::schedule::ScheduleError>()
            || cause.is::<conveyor_jobs::Reserved>()
            || cause
                .downcast_ref::<conveyor_admin::Error>()
                .is_some_and(|e| match e {
                    conveyor_admin::Error::Webhook(w) => webhook_input(w),
                    other => other.is_bad_input(),
                })
            || matches!(
                cause.downcast_ref::<conveyor_worker::Error>(),
                Some(
                    conveyor_worker::Error::InvalidInput { .. }
                        | conveyor_worker::Error::BadUrl { .. }
                )
            )
            || cause
                .downcast_ref::<WebhookError>()
                .is_some_and(webhook_input)
            || cause
                .downcast_ref::<conveyor_analytics::application::Error>()
                .is_some_and(|e| e.is_bad_input())
            || matches!(
                cause.downcast_ref::<conveyor_backup::Error>(),
                Some(conveyor_backup::Error::Config(_))
            )
    });
    if bad_input { 2 } else { 1 }
}

async fn run(cli: Cli, kinds: Kinds) -> anyhow::Result<()> {
    // A probe needs neither the config nor the store.
    if let Command::Health(args) = &cli.command {
        return health(args).await;
    }
    // The benchmark takes its store from --url alone and ignores the config file.
    if let Command::Bench(args) = cli.command {
        init_logging(cli.log_level.as_deref(), "warn", LogFormat::Text);
        return bench::run(args).await;
    }

    let mut config = config::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(url) = cli.database_url {
        config.database.url = url;
        config.validate()?;
    }
    let long_running = matches!(cli.command, Command::Serve(_) | Command::Worker(_));
    let fallback = if long_running {
        config.log.level.as_str()
    } else {
        "warn"
    };
    init_logging(cli.log_level.as_deref(), fallback, config.log.format);

    match cli.command {
        Command::Serve(args) => {
            if let Some(roles) = args.roles {
                config.serve.roles = roles;
            }
            if let Some(listen) = args.listen {
                config.serve.listen = listen;
            }
            if let Some(queues) = &args.queues {
                config.set_queues(queues)?;
            }
            config.validate()?;
            kinds.warn_unserved(&config);
            let store = open_store(&config).await?;
            let keys = secrets::keyring(&config, true)?;
            serve::run(config, store, keys, kinds.registry.clone()).await
        }
        Command::Worker(args) => {
            config.serve.roles = vec![Role::Worker, Role::Scheduler];
            if let Some(queues) = &args.queues {
                config.set_queues(queues)?;
            }
            kinds.warn_unserved(&config);
            let store = open_store(&config).await?;
            let keys = secrets::keyring(&config, true)?;
            serve::run(config, store, keys, kinds.registry.clone()).await
        }
        Command::Migrate(out) => {
            let store = open_store(&config).await?;
            let backend = store.backend_name().await?;
            let url = store::redact_url(&config.database.url);
            let sealed = webhooks(&config, store, true)?
                .seal_secrets(SealPass::Plaintext)
                .await?
                .sealed;
            if out.json {
                return output::json(&serde_json::json!({
                    "migrated": true,
                    "backend": backend,
                    "url": url,
                    "secrets_encrypted": sealed,
                }));
            }
            outln!("migrations applied: {backend} at {url}");
            if sealed > 0 {
                outln!("webhook signing secrets stored in clear, now encrypted: {sealed}");
            }
            Ok(())
        }
        Command::Enqueue(args) => {
            commands::enqueue(&open_admin(&config, &kinds).await?, args).await
        }
        Command::Jobs(cmd) => commands::jobs(&open_admin(&config, &kinds).await?, cmd).await,
        Command::Dead(cmd) => commands::dead(&open_admin(&config, &kinds).await?, cmd).await,
        Command::Queues(args) => commands::queues(&open_admin(&config, &kinds).await?, args).await,
        Command::Schedules(cmd) if schedules::from_config_only(&config, &cmd) => {
            schedules::next_from_config(&config, cmd)
        }
        Command::Schedules(cmd) => {
            config.compiled_schedules()?;
            schedules::run(&config, &open_admin(&config, &kinds).await?, cmd).await
        }
        Command::Keys(cmd) => commands::keys(&open_admin(&config, &kinds).await?, cmd).await,
        Command::Audit(cmd) => commands::audit(open_store(&config).await?, cmd).await,
        Command::Webhooks(cmd) => {
            webhooks::run(&open_admin_with(&config, &kinds, true).await?, cmd).await
        }
        Command::Email(cmd) => emails::run(&open_admin(&config, &kinds).await?, cmd).await,
        Command::Secrets(cmd @ secrets::SecretsCommand::GenerateKey(_)) => {
            secrets::run(None, cmd).await
        }
        Command::Secrets(cmd) => {
            let hooks = webhooks(&config, open_store(&config).await?, false)?;
            secrets::run(Some(hooks), cmd).await
        }
        Command::Backup(cmd) => backups::run(&config, cmd).await,
        Command::Stats(args) => {
            crate::stats::run(open_store(&config).await?, &config.stats, args).await
        }
        Command::Analytics(cmd) => {
            let rollups = crate::analytics::service(&config, open_store(&config).await?)?;
            crate::analytics::run(&rollups, cmd).await
        }
        Command::Bench(_) | Command::Health(_) => unreachable!("handled above"),
    }
}

/// `health`: GET the URL; a 2xx answer is healthy, anything else (or none) an error.
async fn health(args: &crate::cli::HealthArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()
        .context("cannot build the HTTP client")?;
    let response = client.get(&args.url).send().await.with_context(|| {
        format!(
            "no answer from {} within {:?}: is Conveyor running, and listening there?",
            args.url, args.timeout
        )
    })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{} answered {status}: {}", args.url, body.trim());
    }
    outln!("{}", body.trim());
    Ok(())
}

/// The operator operations over the configured store, with the config's webhook settings,
/// secrets keys and `api.*` limits: the same rules the API applies.
async fn open_admin(config: &Config, kinds: &Kinds) -> anyhow::Result<conveyor_admin::Admin> {
    open_admin_with(config, kinds, false).await
}

/// [`open_admin`]; `create_key`: make a SQLite store's key file if it has none (for the
/// commands that write secrets).
async fn open_admin_with(
    config: &Config,
    kinds: &Kinds,
    create_key: bool,
) -> anyhow::Result<conveyor_admin::Admin> {
    let store = open_store(config).await?;
    let hooks = webhooks(config, store.clone(), create_key)?;
    let emails = emails::checker(config, store.clone())?;
    let http = http_targets::service(config, store, &secrets::keyring(config, false)?)?;
    Ok(
        conveyor_admin::Admin::new(Arc::new(hooks), config.api.limits())
            .with_validators(emails::validators(&http, &emails, &kinds.registry)),
    )
}

/// The webhook service over `store` with the configured keys (`create`: make a SQLite
/// store's key file if it has none).
fn webhooks(
    config: &Config,
    store: Arc<dyn Store>,
    create: bool,
) -> anyhow::Result<conveyor_jobs::webhook::Webhooks> {
    let keys = secrets::keyring(config, create)?;
    Ok(conveyor_jobs::webhook::Webhooks::new(store, config.webhooks.clone())?.with_keyring(keys))
}

/// Opens (and migrates) the configured store, with an error that says how to fix it.
pub(crate) async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = &config.database.url;
    let options = StoreOptions {
        max_connections: config.database.max_connections,
        pooler: config.database.pooler,
        listen_url: config.database.listen_url.clone(),
        pg_session: Some(config.database.pg_session()),
    };
    store::connect(url, options).await.map_err(|e| {
        // The hint helps when the store cannot be reached; a store that answered (its disk is
        // full, a migration failed) says what is wrong itself.
        let hint = if e.is_unreachable() {
            ". Check that the database is running and reachable, and set database.url, \
             CONVEYOR_DATABASE__URL or --database-url"
        } else {
            ""
        };
        let text = format!(
            "cannot open the store at {}: {e}{hint}",
            store::redact_url(url)
        );
        anyhow::Error::new(e).context(text)
    })
}

/// The log filter, first found wins: `--log-level`, then `RUST_LOG`, then `fallback` (the
/// config's `log.level` for `serve`/`worker`, `warn` for short commands).
fn log_filter(flag: Option<&str>, rust_log: Option<&str>, fallback: &str) -> EnvFilter {
    [
        flag,
        rust_log.filter(|s| !s.trim().is_empty()),
        Some(fallback),
    ]
    .into_iter()
    .flatten()
    .find_map(|f| EnvFilter::try_new(f).ok())
    .unwrap_or_else(|| EnvFilter::new("info"))
}

fn init_logging(flag: Option<&str>, fallback: &str, format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = log_filter(flag, rust_log.as_deref(), fallback);
    // Logging never takes the process down: a log reader that goes away (a shipper
    // restarting, `2>&1 | head`) costs the lines written meanwhile, nothing else.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(console::LogWriter)
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[cfg(test)]
mod tests {
    use conveyor_worker::{Handler, JobArgs, JobContext, KindOptions, Outcome};

    use super::{App, log_filter};

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Greet {
        name: String,
    }

    impl JobArgs for Greet {
        const KIND: &'static str = "greet";
        const QUEUE: &'static str = "people";
    }

    impl Handler for Greet {
        async fn run(self, _ctx: JobContext) -> anyhow::Result<Outcome> {
            Ok(Outcome::Done)
        }
    }

    #[test]
    fn an_app_has_the_builtin_kinds_and_its_own() {
        let app = App::new().kind::<Greet>();
        assert!(app.errors.is_empty(), "{:?}", app.errors);
        let kinds = app.registry().kinds();
        for kind in ["demo.echo", "demo.sleep", "demo.fail", "noop", "greet"] {
            assert!(kinds.contains(&kind), "{kinds:?}");
        }
        assert_eq!(app.queues, [("greet".to_string(), "people".to_string())]);
    }

    #[tokio::test]
    async fn registration_mistakes_stop_the_app_with_status_2() {
        let done = |_: serde_json::Value, _: JobContext| async { Ok(Outcome::Done) };
        let app = App::new()
            .kind::<Greet>()
            .handle(|_: Greet, _: JobContext| async { Ok(Outcome::Done) })
            .register("demo.echo", KindOptions::default(), done)
            .register("webhook.deliver", KindOptions::default(), done)
            .register("bad kind!", KindOptions::default(), done);
        assert_eq!(app.errors.len(), 4, "{:?}", app.errors);
        assert!(app.errors[0].contains("kind `greet` is registered twice"));
        assert!(app.errors[1].contains("kind `demo.echo` is registered twice"));
        assert!(app.errors[2].contains("`webhook.deliver` is the platform's own"));
        assert!(app.errors[3].contains("kind"), "{}", app.errors[3]);
        // Whatever the command: it does not run.
        let status = app
            .run_with(["app", "queues", "--database-url", "sqlite::memory:"])
            .await;
        assert_eq!(status, std::process::ExitCode::from(2));
    }

    #[test]
    fn log_level_flag_beats_rust_log_which_beats_config() {
        assert_eq!(
            log_filter(Some("debug"), Some("error"), "info").to_string(),
            "debug"
        );
        assert_eq!(log_filter(None, Some("error"), "info").to_string(), "error");
        assert_eq!(log_filter(None, Some(" "), "info").to_string(), "info");
        assert_eq!(log_filter(None, None, "warn").to_string(), "warn");
    }
}
