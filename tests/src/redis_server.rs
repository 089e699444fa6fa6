//! A private `redis-server` for tests that change server settings (memory limits, eviction
//! policy, persistence) or kill and restart the server: never the shared server other tests
//! use.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::eventually;

/// A private Redis server on a free loopback port, with its files in a temp folder. Dropping
/// it kills the server and deletes the folder, so a failing test cleans up too.
pub struct PrivateRedis {
    binary: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one with `args` besides port, folder and log file, or returns `None` (with
    /// the reason printed) when `redis-server` is not installed outside CI.
    pub async fn start(args: &[&str]) -> Option<PrivateRedis> {
        let Some(binary) = find_on_path("redis-server") else {
            return crate::unavailable(
                "redis-server is not on PATH; install Redis to run this test",
            );
        };
        let dir =
            std::env::temp_dir().join(format!("conveyor-redis-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = PrivateRedis {
            binary,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir,
            port,
            child: None,
        };
        server.spawn().await;
        Some(server)
    }

    /// Starts the server process (again, after [`PrivateRedis::kill`], on the same port and
    /// folder) and waits until it answers `PING` (a server still loading its append-only
    /// file answers `LOADING`).
    pub async fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("a loopback Redis URL");
        eventually(20, "the private Redis to answer PING", || {
            let client = client.clone();
            async move {
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
                    .map(drop)
            }
        })
        .await;
    }

    /// SIGKILL: no shutdown save, no goodbye to clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A plain connection, for what the test itself reads and sets on the server.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("a loopback Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("the private Redis accepts connections")
    }

    /// `CONFIG SET name value` on this server.
    pub async fn set_config(&self, name: &str, value: &str) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async::<()>(&mut self.conn().await)
            .await
            .expect("CONFIG SET on the private Redis");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
