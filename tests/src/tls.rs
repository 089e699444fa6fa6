//! TLS for the tests: certificates made with the `openssl` command line for one test, and a
//! private `redis-server` that speaks only TLS.
//!
//! Every [`Certs`] is a CA, a server certificate it signed for `localhost` and `127.0.0.1`, a
//! client certificate it signed, and a second CA that signed nothing (the wrong one). EC keys:
//! they are made in milliseconds.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Certificates in a temp folder, deleted on drop.
pub struct Certs {
    /// The folder.
    pub dir: PathBuf,
}

impl Certs {
    /// Makes a set, or returns `None` (with the reason printed) when `openssl` is missing,
    /// outside CI.
    pub fn generate() -> Option<Certs> {
        if find_on_path("openssl").is_none() {
            return crate::unavailable(
                "openssl is not on PATH; install it (scripts/test-deps.sh) to run the TLS tests",
            );
        }
        let dir =
            std::env::temp_dir().join(format!("conveyor-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let certs = Certs { dir };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for ca in ["ca", "other-ca"] {
            certs.openssl(
                &[&["req", "-x509", "-nodes", "-days", "2"], &ec[..]].concat(),
                &[
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-subj",
                    &format!("/CN=Conveyor test {ca}"),
                ],
            );
        }
        std::fs::write(
            certs.dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("temp dir is writable");
        std::fs::write(
            certs.dir.join("client.ext"),
            "extendedKeyUsage=clientAuth\n",
        )
        .expect("temp dir is writable");
        for (name, cn) in [("server", "localhost"), ("client", "conveyor")] {
            certs.openssl(
                &[&["req", "-nodes"], &ec[..]].concat(),
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
            certs.openssl(
                &["x509", "-req", "-days", "2", "-CAcreateserial"],
                &[
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            );
        }
        Some(certs)
    }

    /// A file of the set: `ca.pem`, `other-ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn openssl(&self, args: &[&str], more: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .args(more)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?} {more:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private `redis-server` listening only for TLS on a free loopback port, with the server
/// certificate of its own [`Certs`]. Dropping it kills the server and deletes the certificates.
pub struct TlsRedis {
    /// The port.
    pub port: u16,
    /// Its certificates.
    pub certs: Certs,
    child: Child,
}

impl TlsRedis {
    /// Starts one (`client_certs`: the server requires a client certificate signed by the CA),
    /// or returns `None` (with the reason printed) when `redis-server` or `openssl` is missing
    /// or the server was built without TLS, outside CI.
    pub async fn start(client_certs: bool) -> Option<TlsRedis> {
        let Some(binary) = find_on_path("redis-server") else {
            return crate::unavailable(
                "redis-server is not on PATH; install Redis to run the Redis TLS tests",
            );
        };
        let certs = Certs::generate()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let log = certs.path("redis.log");
        let child = Command::new(binary)
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&certs.dir)
            .arg("--tls-cert-file")
            .arg(certs.path("server.pem"))
            .arg("--tls-key-file")
            .arg(certs.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(certs.path("ca.pem"))
            .args([
                "--tls-auth-clients",
                if client_certs { "yes" } else { "no" },
            ])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let mut server = TlsRedis { port, certs, child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return crate::unavailable(&format!(
                    "redis-server with --tls-port exited ({status}); is it built with TLS? {log}"
                ));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the TLS redis-server did not listen within 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// `rediss://localhost:PORT/0` with `params` (`tls_ca_file=…` etc.) appended.
    pub fn url(&self, params: &[(&str, &Path)]) -> String {
        let mut url = format!("rediss://localhost:{}/0", self.port);
        for (i, (name, value)) in params.iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("{name}={}", value.display()));
        }
        url
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The local Postgres server's certificate when the tests' server is this machine's
/// (Debian's snakeoil certificate, for `localhost`): verify-full works against it.
pub fn local_pg_ca() -> Option<PathBuf> {
    let admin = crate::pg_admin_url();
    let local = admin.contains("@127.0.0.1:") || admin.contains("@localhost:");
    let ca = PathBuf::from("/etc/ssl/certs/ssl-cert-snakeoil.pem");
    (local && ca.is_file()).then_some(ca)
}

/// The tests' Postgres URL `url` made to speak TLS: verify-full against the snakeoil CA
/// through `localhost` when the server is local, else `sslmode=require`.
pub fn pg_tls_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    match local_pg_ca() {
        Some(ca) => format!(
            "{}{sep}sslmode=verify-full&sslrootcert={}",
            url.replacen("@127.0.0.1:", "@localhost:", 1),
            ca.display()
        ),
        None => format!("{url}{sep}sslmode=require"),
    }
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
