//! A private PgBouncer in front of the test Postgres, for the suites that run through a
//! connection pooler ([`crate::TestStore::pgbouncer`]).
//!
//! Each one listens on a free loopback port with `auth_type = trust`, its config in a temp
//! folder the `postgres` user can read (PgBouncer refuses to run as root, so as root it is
//! started with `-u postgres`). Transaction mode gets a server pool smaller than a test
//! store's own pool, so transactions of different clients really do share server connections.
//! Dropping it kills the process and deletes the folder.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conveyor_worker::store::Pooler;

/// Server connections per database and user in transaction mode: fewer than the 8 a test
/// store opens, so clients take turns on them.
const TRANSACTION_POOL: u32 = 3;
/// In session mode every client holds a server connection for its whole life (a store's pool,
/// its LISTEN connection, a second store in the same test).
const SESSION_POOL: u32 = 60;

/// A running PgBouncer.
pub struct PgBouncer {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    mode: Pooler,
}

/// Where PgBouncer is installed, if it is: `CONVEYOR_TEST_PGBOUNCER` if set, else the usual
/// places.
fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CONVEYOR_TEST_PGBOUNCER") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    [
        "/usr/sbin/pgbouncer",
        "/usr/bin/pgbouncer",
        "/usr/local/bin/pgbouncer",
    ]
    .map(PathBuf::from)
    .into_iter()
    .find(|p| p.is_file())
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` (session or transaction) in front of the server that
    /// `admin_url` names. `Err` says why it could not (not installed, failed to start).
    pub fn start(mode: Pooler, admin_url: &str) -> Result<PgBouncer, String> {
        let pool_size = match mode {
            Pooler::Transaction => TRANSACTION_POOL,
            _ => SESSION_POOL,
        };
        Self::start_with_pool(mode, admin_url, pool_size)
    }

    /// [`PgBouncer::start`] with `default_pool_size = pool_size`.
    pub fn start_with_pool(
        mode: Pooler,
        admin_url: &str,
        pool_size: u32,
    ) -> Result<PgBouncer, String> {
        let pool_mode = match mode {
            Pooler::Session => "session",
            Pooler::Transaction => "transaction",
            Pooler::None => return Err("PgBouncer needs a pool mode".into()),
        };
        let binary = binary().ok_or_else(|| {
            "pgbouncer is not installed (apt-get install pgbouncer, or scripts/test-deps.sh; CONVEYOR_TEST_PGBOUNCER names another binary)".to_string()
        })?;
        let (host, port) = server_address(admin_url);
        let dir = std::env::temp_dir().join(format!(
            "conveyor-pgbouncer-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let listen = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let ini = format!(
            "[databases]\n* = host={host} port={port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\npool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\nmax_client_conn = 1000\n\
             server_login_retry = 1\nlog_connections = 0\nlog_disconnections = 0\n",
            users = dir.join("users.txt").display(),
        );
        write_readable(&dir.join("pgbouncer.ini"), &ini)?;
        write_readable(&dir.join("users.txt"), "\"postgres\" \"\"\n")?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot open up {}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.join("stderr.log"))
            .map_err(|e| format!("cannot create the log file: {e}"))?;
        let mut cmd = Command::new(&binary);
        // PgBouncer refuses to run as root; the postgres user exists wherever Postgres is.
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if root {
            cmd.args(["-u", "postgres"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let mut bouncer = PgBouncer {
            child: Some(child),
            dir,
            port: listen,
            mode,
        };
        bouncer.wait_listening()?;
        Ok(bouncer)
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                let log = std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                return Err(format!("pgbouncer exited at start ({status}): {log}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "pgbouncer did not listen on port {} within 10 s",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its pool mode.
    pub fn mode(&self) -> Pooler {
        self.mode
    }

    /// A URL for database `db` through this PgBouncer, with `?pooler=` set to its mode.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?pooler={}",
            self.port, self.mode
        )
    }

    /// A URL for database `db` through this PgBouncer that does not say a pooler is there.
    pub fn bare_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Kills it (SIGKILL) and removes its folder. Also what dropping does.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_readable(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("cannot open up {}: {e}", path.display()))
}

/// Host and port of a `postgres://user@host:port/db` URL (defaults 127.0.0.1, 5432).
fn server_address(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(5432)),
        None if hostport.is_empty() => ("127.0.0.1".into(), 5432),
        None => (hostport.to_string(), 5432),
    }
}
