//! `conveyor bench --workload email`: SMTP sending through lettre's connection pool beside a
//! one-connection-per-message baseline, in the same run, to a sink in this process.
//!
//! The sink is a minimal SMTP server on a loopback port written for the benchmark: it
//! answers `250` to everything (`354` to `DATA`, `221` to `QUIT`) and counts the messages
//! whose data ends; it parses nothing and stores nothing, so what is measured is the sending
//! side. It is not an SMTP implementation to send real mail to.
//!
//! 1. Pool: `--jobs` messages (the same bytes `email.send` builds from its args) sent by
//!    `min(--concurrency, 64)` tasks through one `AsyncSmtpTransport` whose pool holds as
//!    many connections, each message its own SMTP transaction, as `email.send` sends them.
//! 2. Baseline: the same number of messages by as many tasks, each message over a new
//!    connection (connect, greeting, EHLO, the transaction, QUIT).
//!
//! 3. Kept connections: each sender opens one connection and sends its share of the messages
//!    over it, without the pool (lettre's pool sends `NOOP` to check a connection each time
//!    it hands one out: one more round trip per message).
//! 4. The sink alone: each sender writes a whole transaction at once (MAIL, RCPT, DATA and
//!    the message, pipelined) on a kept connection and reads the four replies: how many
//!    messages the sink can take on this machine, with the least sending work.
//!
//! Each phase prints emails/s (messages the sink accepted / the phase's wall time). The
//! job store is not involved: `--workload jobs` measures that part.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use conveyor_jobs::email::{EmailArgs, EmailConfig, MailboxArg};
use lettre::address::Envelope;
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::client::{AsyncSmtpConnection, Tls};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::{BenchArgs, round};

/// The result line.
#[derive(Debug, Serialize)]
struct EmailBenchResult {
    system: &'static str,
    workload: &'static str,
    emails: u64,
    concurrency: usize,
    pool_emails_s: f64,
    baseline_emails_s: f64,
    /// Each sender on a connection of its own, kept (no pool, so no check of the connection
    /// before each message): what lettre's pool costs.
    kept_connection_emails_s: f64,
    /// The sink alone: each sender writes a whole transaction at once (pipelined) on a kept
    /// connection and reads the four replies; the most the sink accepts on this machine.
    sink_alone_emails_s: f64,
}

/// Serves one sink connection until QUIT or the peer closes.
async fn sink_connection(stream: tokio::net::TcpStream, accepted: Arc<AtomicU64>) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    if write
        .write_all(b"220 conveyor-bench-sink\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let verb: Vec<u8> = line.iter().take(4).map(u8::to_ascii_uppercase).collect();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-conveyor-bench-sink\r\n250 8BITMIME\r\n",
            b"DATA" => {
                if write.write_all(b"354 go ahead\r\n").await.is_err() {
                    return;
                }
                // The data, up to the line holding a lone dot.
                loop {
                    line.clear();
                    match lines.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == b".\r\n" => break,
                        Ok(_) => {}
                    }
                }
                accepted.fetch_add(1, Ordering::Relaxed);
                b"250 2.0.0 queued\r\n"
            }
            b"QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            }
            _ => b"250 OK\r\n",
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// Sends `n` messages with `tasks` tasks, each message through `send`; the wall time.
async fn phase<F, Fut>(n: u64, tasks: usize, send: F) -> anyhow::Result<Duration>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let send = Arc::new(send);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let next = next.clone();
        let send = send.clone();
        handles.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                send().await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(started.elapsed())
}

/// Runs the email protocol.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicU64::new(0));
    let sink_count = accepted.clone();
    let sink = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(sink_connection(stream, sink_count.clone()));
        }
    });

    let n = args.jobs;
    let tasks = args.concurrency.clamp(1, 64) as usize;
    let message = EmailArgs {
        from: "Shop <shop@example.com>".into(),
        to: vec![MailboxArg::from("Åsa Öberg <asa@example.org>")],
        subject: "Your receipt №42".into(),
        html: Some("<h1>Thanks!</h1><p>Your order <b>#42</b> has shipped.</p>".into()),
        ..EmailArgs::default()
    };
    let mut config = EmailConfig::default();
    config.transports.insert(
        "sink".into(),
        conveyor_jobs::email::Transport::new("127.0.0.1"),
    );
    let built = message
        .build(&config, "0193b2c4-0000-7000-8000-000000000000")
        .context("building the benchmark's message")?;
    let raw: Arc<[u8]> = built.raw.into();
    let envelope = Envelope::new(Some(built.from), vec![built.recipients[0].0.clone()])?;
    if !args.json {
        errln!(
            "conveyor bench --workload email: {n} emails of {} bytes, {tasks} senders, to a sink on 127.0.0.1:{port}",
            raw.len()
        );
    }

    // 1. Through the pool.
    let pool = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .tls(Tls::None)
        .timeout(Some(Duration::from_secs(30)))
        .pool_config(PoolConfig::new().max_size(tasks as u32))
        .build();
    let (p_raw, p_env) = (raw.clone(), envelope.clone());
    let took_pool = phase(n, tasks, move || {
        let (pool, raw, envelope) = (pool.clone(), p_raw.clone(), p_env.clone());
        async move {
            pool.send_raw(&envelope, &raw).await?;
            Ok(())
        }
    })
    .await
    .context("the pooled phase")?;
    let pooled = accepted.swap(0, Ordering::Relaxed);

    // 2. One connection per message.
    let (b_raw, b_env) = (raw.clone(), envelope.clone());
    let took_baseline = phase(n, tasks, move || {
        let (raw, envelope) = (b_raw.clone(), b_env.clone());
        async move {
            let mut c = AsyncSmtpConnection::connect_tokio1(
                ("127.0.0.1", port),
                Some(Duration::from_secs(30)),
                &ClientId::Domain("localhost".into()),
                None,
                None,
            )
            .await?;
            c.send(&envelope, &raw).await?;
            c.quit().await?;
            Ok(())
        }
    })
    .await
    .context("the one-connection-per-message phase")?;
    let baseline = accepted.swap(0, Ordering::Relaxed);

    // 3. Each sender on its own kept connection, without the pool.
    let per_task = |i: usize| n / tasks as u64 + u64::from((i as u64) < n % tasks as u64);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let (raw, envelope, count) = (raw.clone(), envelope.clone(), per_task(i));
        handles.push(tokio::spawn(async move {
            let mut c = AsyncSmtpConnection::connect_tokio1(
                ("127.0.0.1", port),
                Some(Duration::from_secs(30)),
                &ClientId::Domain("localhost".into()),
                None,
                None,
            )
            .await?;
            for _ in 0..count {
                c.send(&envelope, &raw).await?;
            }
            c.quit().await?;
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let took_kept = started.elapsed();
    let kept = accepted.swap(0, Ordering::Relaxed);

    // 4. The sink alone: a transaction written at once, the replies read back.
    let mut transaction =
        b"MAIL FROM:<shop@example.com>\r\nRCPT TO:<asa@example.org>\r\nDATA\r\n".to_vec();
    transaction.extend_from_slice(&raw);
    if !transaction.ends_with(b"\r\n") {
        transaction.extend_from_slice(b"\r\n");
    }
    transaction.extend_from_slice(b".\r\n");
    let transaction: Arc<[u8]> = transaction.into();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let (transaction, count) = (transaction.clone(), per_task(i));
        handles.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.set_nodelay(true)?;
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read);
            let mut line = Vec::with_capacity(128);
            // Greeting, then EHLO's two lines.
            lines.read_until(b'\n', &mut line).await?;
            write.write_all(b"EHLO localhost\r\n").await?;
            for _ in 0..2 {
                line.clear();
                lines.read_until(b'\n', &mut line).await?;
            }
            for _ in 0..count {
                write.write_all(&transaction).await?;
                for _ in 0..4 {
                    line.clear();
                    if lines.read_until(b'\n', &mut line).await? == 0 {
                        bail!("the sink closed the connection");
                    }
                }
            }
            write.write_all(b"QUIT\r\n").await?;
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let took_sink = started.elapsed();
    let sink_only = accepted.load(Ordering::Relaxed);
    sink.abort();
    if pooled != n || baseline != n || kept != n || sink_only != n {
        bail!("the sink accepted {pooled}, {baseline}, {kept} and {sink_only} messages of {n}");
    }

    let result = EmailBenchResult {
        system: "conveyor",
        workload: "email",
        emails: n,
        concurrency: tasks,
        pool_emails_s: round(n as f64 / took_pool.as_secs_f64(), 0),
        baseline_emails_s: round(n as f64 / took_baseline.as_secs_f64(), 0),
        kept_connection_emails_s: round(n as f64 / took_kept.as_secs_f64(), 0),
        sink_alone_emails_s: round(n as f64 / took_sink.as_secs_f64(), 0),
    };
    if args.json {
        outln!("{}", serde_json::to_string(&result)?);
    } else {
        outln!(
            "pool: {} emails/s ({} ms)\none connection per message: {} emails/s ({} ms)\none kept connection per sender, no pool: {} emails/s ({} ms)\nthe sink alone (pipelined transactions): {} emails/s ({} ms)",
            result.pool_emails_s,
            took_pool.as_millis(),
            result.baseline_emails_s,
            took_baseline.as_millis(),
            result.kept_connection_emails_s,
            took_kept.as_millis(),
            result.sink_alone_emails_s,
            took_sink.as_millis()
        );
    }
    Ok(())
}
