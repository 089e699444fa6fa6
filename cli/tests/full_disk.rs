//! Starting on a full store says the disk is full, not that the database may be down.

mod common;

#[test]
fn starting_on_a_full_sqlite_store_says_the_disk_is_full() {
    let dir = std::env::temp_dir().join(format!("conveyor-full-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // A new file capped at one page cannot take the migrations: what a full disk does.
    let url = format!(
        "sqlite://{}?max_page_count=1",
        dir.join("jobs.db").display()
    );
    let output = common::conveyor(&url, &["queues"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("database is full"), "{stderr}");
    assert!(stderr.contains("free space"), "{stderr}");
    assert!(
        !stderr
            .to_lowercase()
            .contains("check that the database is running"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_store_still_gets_the_hint() {
    let url = "postgres://postgres@127.0.0.1:1/nothing";
    let output = common::conveyor(url, &["queues"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr
            .to_lowercase()
            .contains("check that the database is running"),
        "{stderr}"
    );
}
