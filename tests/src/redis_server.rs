//! A private `redis-server` for tests that change server settings (memory limits, eviction
//! policy, persistence, TLS): never the shared server other tests use.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::eventually;

/// A private Redis server on a free loopback port, with its files in a temp folder. Dropping
/// it kills the server and deletes the folder, so a failing test cleans up too.
pub struct PrivateRedis {
    dir: PathBuf,
    port: u16,
    child: Child,
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
        let dir = std::env::temp_dir().join(format!(
            "conveyor-redis-prod-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .args(["--logfile", "redis.log"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = PrivateRedis { dir, port, child };
        let client = redis::Client::open(server.url()).unwrap();
        eventually(10, "the private Redis to answer PING", || {
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
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A plain connection, for what the test itself reads and sets on the server.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
