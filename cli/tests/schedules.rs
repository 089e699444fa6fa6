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
    // Spring: 02:30 does not exist on 2027-03-28 and is skipped.
    assert_eq!(
        next_three(&cfg.file, "2027-03-26T12:00:00Z"),
        [
            "2027-03-27 02:30:00 CET (+01:00)",
            "2027-03-29 02:30:00 CEST (+02:00)",
            "2027-03-30 02:30:00 CEST (+02:00)",
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
    let (code, out, _) = conveyor(&cfg.file, &["schedules", "list", "--json"]);
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["name"], "nightly");
    assert_eq!(rows[0]["timezone"], "Europe/Berlin");
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
    assert_eq!(code, 1);
    assert!(
        err.contains("no schedule named `weekly`") && err.contains("nightly"),
        "{err}"
    );
}
