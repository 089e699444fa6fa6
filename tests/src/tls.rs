//! TLS for the tests: certificates made with the `openssl` command line for one test, and a
//! private `redis-server` that speaks only TLS.
//!
//! Every [`Certs`] is a CA, a server certificate it signed for `localhost` and `127.0.0.1`, a
//! client certificate it signed, a second CA that signed nothing (the wrong one), and a
//! self-signed certificate of the server's key. EC keys: they are made in milliseconds.

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
        // The server's key in a certificate signed by itself (no CA), for `localhost` too.
        certs.openssl(
            &["x509", "-req", "-days", "2"],
            &[
                "-in",
                "server.csr",
                "-signkey",
                "server.key",
                "-extfile",
                "server.ext",
                "-out",
                "self-signed.pem",
            ],
        );
        Some(certs)
    }

    /// A file of the set: `ca.pem`, `other-ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`, and `self-signed.pem` (the server's key, certified by itself).
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

/// A throwaway Postgres cluster (`initdb` + `pg_ctl`, run as the `postgres` user when the
/// tests run as root) on a free loopback port that accepts only TLS with a client certificate
/// (`hostssl … cert`), its server certificate and CA from its own [`Certs`]. Its superuser is
/// `conveyor`, the client certificate's CN. Dropping it stops the cluster and deletes it.
pub struct CertPostgres {
    /// The port.
    pub port: u16,
    /// Its certificates.
    pub certs: Certs,
    data: PathBuf,
    run_as_postgres: bool,
    pg_ctl: PathBuf,
}

impl CertPostgres {
    /// Starts one, or returns `None` (with the reason printed) when the Postgres server
    /// binaries or `openssl` are missing, outside CI.
    pub fn start() -> Option<CertPostgres> {
        let bin = ["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin"]
            .into_iter()
            .map(PathBuf::from)
            .chain(find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)))
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file());
        let Some(bin) = bin else {
            return crate::unavailable(
                "initdb and pg_ctl are not installed; install the Postgres server to run the client-certificate test",
            );
        };
        let certs = Certs::generate()?;
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let data = certs.path("pgdata");
        std::fs::create_dir_all(&data).expect("temp dir is writable");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let server = CertPostgres {
            port,
            certs,
            data: data.clone(),
            run_as_postgres: root,
            pg_ctl: bin.join("pg_ctl"),
        };
        if root {
            // Postgres refuses to run as root; the cluster and its key belong to `postgres`.
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&server.certs.dir));
        }
        server.run(
            &bin.join("initdb"),
            &["-N", "-U", "conveyor", "--auth=trust", "-D"],
            &[&data],
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 cert\nhostssl all all ::1/128 cert\n",
        )
        .expect("the cluster folder is writable");
        for file in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(server.certs.path(file), data.join(file)).expect("copy certificates");
        }
        if root {
            run(Command::new("chown").arg("-R").arg("postgres:").arg(&data));
        }
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")));
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key \
             -c ssl_ca_file=ca.pem -c fsync=off",
            data.display()
        );
        let log = data.join("server.log");
        server.run(
            &server.pg_ctl.clone(),
            &["-w", "-t", "20", "-o", &options, "-l"],
            &[&log, Path::new("-D"), &data, Path::new("start")],
        );
        Some(server)
    }

    fn run(&self, program: &Path, args: &[&str], paths: &[&Path]) {
        let mut cmd = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).args(paths);
        run(&mut cmd);
    }

    /// `postgres://conveyor@localhost:PORT/postgres?sslmode=verify-full&sslrootcert=…`,
    /// with the client certificate when `client_cert`.
    pub fn url(&self, client_cert: bool) -> String {
        let c = &self.certs;
        let mut url = format!(
            "postgres://conveyor@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.port,
            c.path("ca.pem").display()
        );
        if client_cert {
            url.push_str(&format!(
                "&sslcert={}&sslkey={}",
                c.path("client.pem").display(),
                c.path("client.key").display()
            ));
        }
        url
    }
}

impl Drop for CertPostgres {
    fn drop(&mut self) {
        let mut cmd = if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            c
        } else {
            Command::new(&self.pg_ctl)
        };
        let _ = cmd
            .args(["-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} runs: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
