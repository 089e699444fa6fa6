//! `conveyor schedules`: answered from the config file, with daylight saving applied and bad
//! schedules rejected with the field that is wrong.

use std::process::Command;

fn config(body: &str) -> tempfile_path::TempConfig {
    tempfile_path::TempConfig::new(body)
}

/// A config file in a fresh temp folder, removed on drop.
mod tempfile_path {
    pub struct TempConfig {
        pub dir: std::path::PathBuf,
        pub file: std::path::PathBuf,
    }
    impl TempConfig {
        pub fn new(body: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("conveyor-sched-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("conveyor.toml");
            // Each config gets a store of its own in its folder.
            let body = format!(
                "[database]\nurl = \"sqlite://{}\"\n{body}",
                dir.join("conveyor.db").display()
            );
            std::fs::write(&file, body).unwrap();
            Self { dir, file }
        }
    }
    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn conveyor(cfg: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("CONVEYOR_DATABASE__URL")
        .output()
        .expect("conveyor runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const NIGHTLY: &str = r#"
[[schedules]]
name = "nightly"
cron = "30 2 * * *"
timezone = "Europe/Berlin"
kind = "demo.echo"
"#;

/// `schedules next nightly --count 3 --after AFTER`, line by line.
fn next_three(cfg: &std::path::Path, after: &str) -> Vec<String> {
    let (code, out, err) = conveyor(
        cfg,
        &[
            "schedules",
            "next",
            "nightly",
            "--count",
            "3",
            "--after",
            after,
        ],
    );
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_string).collect()
}

#[test]
fn next_fire_times_follow_daylight_saving() {
    let cfg = config(NIGHTLY);
    // Spring: 02:30 does not exist on 2027-03-28; it fires at the end of the gap, 03:00 CEST.
    assert_eq!(
        next_three(&cfg.file, "2027-03-26T12:00:00Z"),
        [
            "2027-03-27 02:30:00 CET (+01:00)",
            "2027-03-28 03:00:00 CEST (+02:00)",
            "2027-03-29 02:30:00 CEST (+02:00)",
        ]
    );
    // Autumn: 02:30 exists twice on 2026-10-25 and fires once.
    assert_eq!(
        next_three(&cfg.file, "2026-10-24T12:00:00Z"),
        [
            "2026-10-25 02:30:00 CEST (+02:00)",
            "2026-10-26 02:30:00 CET (+01:00)",
            "2026-10-27 02:30:00 CET (+01:00)",
        ]
    );
    // Not stored until a scheduler starts: the listing says so.
    let (code, out, err) = conveyor(&cfg.file, &["schedules", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("stored when a scheduler next starts: nightly"),
        "{out}"
    );
}

#[test]
fn next_gives_the_count_asked_or_says_there_are_no_more() {
    let cfg = config(
        r#"
[[schedules]]
name = "nightly"
cron = "30 2 * * *"
timezone = "Europe/Berlin"
kind = "demo.echo"

[[schedules]]
name = "last-two"
cron = "0 0 12 1 1 * 2099-2100"
kind = "demo.echo"
"#,
    );
    let next = |name: &str, count: &str| {
        let (code, out, err) = conveyor(
            &cfg.file,
            &[
                "schedules",
                "next",
                name,
                "--count",
                count,
                "--after",
                "2026-12-01T00:00:00Z",
            ],
        );
        assert_eq!(code, 0, "{err}");
        (out.lines().count(), err)
    };
    let (lines, err) = next("nightly", "400");
    assert_eq!(lines, 400, "{err}");
    assert!(err.is_empty(), "{err}");
    // The year 2100 ends the cron crate's range: two fire times, and a note saying so.
    let (lines, err) = next("last-two", "5");
    assert_eq!(lines, 2, "{err}");
    assert!(
        err.contains("`last-two` fires only 2 time(s)")
            && err.contains("none after 2100-01-01T12:00:00+00:00"),
        "{err}"
    );
}

#[test]
fn stored_schedules_through_their_lifecycle() {
    let cfg = config("");
    let run = |args: &[&str]| {
        let (code, out, err) = conveyor(&cfg.file, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        out
    };
    let created: serde_json::Value = serde_json::from_str(&run(&[
        "schedules",
        "create",
        "--name",
        "digest",
        "--cron",
        "0 8 * * MON-FRI",
        "--timezone",
        "America/New_York",
        "--kind",
        "demo.echo",
        "--args",
        r#"{"msg":"good morning"}"#,
        "--json",
    ]))
    .unwrap();
    assert_eq!(created["spec"]["name"], "digest");
    assert_eq!(created["origin"], "api");
    assert!(created["next_fire"].is_string(), "{created}");
    assert!(created["last_fire"].is_null());

    // The same name again is refused; so is a bad field, naming it.
    let (code, _, err) = conveyor(
        &cfg.file,
        &[
            "schedules",
            "create",
            "--name",
            "digest",
            "--cron",
            "* * * * *",
            "--kind",
            "k",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    let (code, _, err) = conveyor(
        &cfg.file,
        &[
            "schedules",
            "create",
            "--name",
            "x",
            "--cron",
            "61 * * * *",
            "--kind",
            "k",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid cron"), "{err}");
    let (code, _, err) = conveyor(
        &cfg.file,
        &[
            "schedules",
            "update",
            "digest",
            "--timezone",
            "Atlantis/Capital",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid timezone"), "{err}");

    // Next fire times come from the store for a stored schedule, in its zone.
    let out = run(&[
        "schedules",
        "next",
        "digest",
        "--count",
        "2",
        "--after",
        "2027-03-12T00:00:00Z",
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "2027-03-12 08:00:00 EST (-05:00)",
            "2027-03-15 08:00:00 EDT (-04:00)"
        ]
    );

    run(&["schedules", "pause", "digest"]);
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["schedules", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["spec"]["enabled"], false);
    assert!(listed[0]["next_fire"].is_null(), "paused: no next fire");
    run(&["schedules", "resume", "digest"]);

    // Trigger enqueues a job now; `show` then reports it.
    let triggered: serde_json::Value =
        serde_json::from_str(&run(&["schedules", "trigger", "digest", "--json"])).unwrap();
    let id = triggered["id"].as_str().unwrap().to_string();
    let job: serde_json::Value =
        serde_json::from_str(&run(&["jobs", "show", &id, "--json"])).unwrap();
    assert_eq!(job["kind"], "demo.echo");
    assert_eq!(job["metadata"]["trigger"], "manual");

    let updated: serde_json::Value = serde_json::from_str(&run(&[
        "schedules",
        "update",
        "digest",
        "--cron",
        "30 7 * * *",
        "--json",
    ]))
    .unwrap();
    assert_eq!(updated["spec"]["cron"], "30 7 * * *");
    assert_eq!(
        updated["spec"]["timezone"], "America/New_York",
        "unchanged fields stay"
    );
    let shown = run(&["schedules", "show", "digest"]);
    assert!(shown.contains("30 7 * * * (America/New_York)"), "{shown}");

    run(&["schedules", "delete", "digest"]);
    let (code, _, err) = conveyor(&cfg.file, &["schedules", "show", "digest"]);
    // An unknown name is bad input (the API answers 400), like an unknown job state.
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no schedule is named `digest`"), "{err}");

    // Every change was audited, as the OS user running the CLI.
    let audit: serde_json::Value =
        serde_json::from_str(&run(&["audit", "list", "--json"])).unwrap();
    let actions: Vec<&str> = audit
        .as_array()
        .or_else(|| audit["entries"].as_array())
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "schedule.delete",
            "schedule.update",
            "schedule.trigger",
            "schedule.resume",
            "schedule.pause",
            "schedule.create"
        ]
    );
}

#[test]
fn bad_schedules_are_rejected_with_the_field() {
    for (body, needle) in [
        (
            NIGHTLY.replace("Europe/Berlin", "Europe/Berlinn"),
            "invalid timezone",
        ),
        (NIGHTLY.replace("30 2 * * *", "30 2 * *"), "invalid cron"),
        (NIGHTLY.replace("30 2 * * *", "30 2 * * 9"), "day-of-week 9"),
        (format!("{NIGHTLY}{NIGHTLY}"), "used twice"),
    ] {
        let cfg = config(&body);
        let (code, _, err) = conveyor(&cfg.file, &["schedules", "list"]);
        assert_eq!(code, 2, "a config error exits 2: {err}");
        assert!(err.contains(needle) && err.contains("schedules["), "{err}");
    }
    let cfg = config(NIGHTLY);
    let (code, _, err) = conveyor(&cfg.file, &["schedules", "next", "weekly"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no schedule is named `weekly`"), "{err}");
}
