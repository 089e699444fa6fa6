//! A log reader that goes away must not take conveyor down: a worker whose stderr pipe is
//! closed mid-run keeps running jobs and still shuts down cleanly, and a short command whose
//! stderr or stdout reader is gone finishes instead of panicking or hanging. And
//! `--log-level` beats `RUST_LOG`, as its help says.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::conveyor;
use conveyor_tests::{TestStore, eventually};
use conveyor_worker::store::JobFilter;
use conveyor_worker::{JobState, NewJob};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Waits for `child` to exit within `secs`; kills it and fails if it does not.
fn wait_exit(child: &mut Child, secs: u64, what: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("wait works") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {secs}s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_log_reader_goes_away_keeps_running_jobs() {
    let t = TestStore::sqlite().await;
    let mut child = conveyor(&t.url, &["--log-level", "debug", "worker"])
        .env("CONVEYOR_WORKER__POLL_INTERVAL", "100ms")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    tokio::task::block_in_place(|| {
        let mut line = String::new();
        loop {
            line.clear();
            let n = stderr.read_line(&mut line).expect("stderr reads");
            assert!(n > 0, "the worker exited before it started");
            if line.contains("worker started") {
                break;
            }
        }
    });
    // The reader goes away; every debug line from now on meets a closed pipe.
    drop(stderr);

    let jobs = (0..20)
        .map(|i| {
            NewJob::new(
                "demo.echo",
                serde_json::json!({ "msg": format!("job {i}") }),
            )
        })
        .collect();
    t.store.enqueue_many(jobs).await.unwrap();
    let store = t.store.clone();
    eventually(30, "every job completes with the log pipe closed", || {
        let store = store.clone();
        async move {
            let done = store
                .count(&JobFilter::state(JobState::Completed))
                .await
                .unwrap();
            (done == 20).then_some(())
        }
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the worker exited while its log reader was gone"
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let code = tokio::task::block_in_place(|| wait_exit(&mut child, 30, "the worker"));
    assert_eq!(
        code,
        Some(0),
        "a clean shutdown despite the closed log pipe"
    );
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_command_whose_log_reader_is_gone_finishes() {
    let t = TestStore::sqlite().await;
    t.store
        .enqueue(NewJob::new("demo.echo", serde_json::json!({ "msg": "hi" })))
        .await
        .unwrap();
    for _ in 0..4 {
        let mut child = conveyor(&t.url, &["--log-level", "debug", "queues"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        drop(child.stderr.take());
        let code = tokio::task::block_in_place(|| wait_exit(&mut child, 20, "`conveyor queues`"));
        assert_eq!(code, Some(0), "`queues` with its stderr reader gone");
    }
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_output_reader_is_gone_ends_quietly() {
    let t = TestStore::sqlite().await;
    let jobs = (0..200)
        .map(|i| {
            NewJob::new(
                "demo.echo",
                serde_json::json!({ "msg": format!("job {i}") }),
            )
        })
        .collect();
    t.store.enqueue_many(jobs).await.unwrap();
    let mut child = conveyor(&t.url, &["jobs", "list", "--limit", "200", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    // As `| head -0` does: the reader is gone before the first line.
    drop(child.stdout.take());
    let out = tokio::task::block_in_place(|| {
        let code = wait_exit(&mut child, 20, "`conveyor jobs list`");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        (code, err)
    });
    assert!(
        matches!(out.0, Some(0) | Some(141)),
        "exit {:?}: {}",
        out.0,
        out.1
    );
    assert!(!out.1.contains("panicked"), "{}", out.1);
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_flag_overrides_rust_log() {
    let t = TestStore::sqlite().await;
    let out = tokio::task::block_in_place(|| {
        conveyor(&t.url, &["--log-level", "debug", "queues"])
            .env("RUST_LOG", "error")
            .output()
            .expect("the binary runs")
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DEBUG"),
        "--log-level debug was not applied: {err}"
    );
    let out = tokio::task::block_in_place(|| {
        conveyor(&t.url, &["queues"])
            .env("RUST_LOG", "debug")
            .output()
            .expect("the binary runs")
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG"), "RUST_LOG beats the default: {err}");
    t.cleanup().await;
}
