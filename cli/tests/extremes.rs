//! Durations typed at the command line at their extremes: an age of 300,000 years or a
//! secret overlap as long saturate at the latest (or earliest) instant the store keeps
//! instead of panicking; a delay as long is refused (at most five years, as over HTTP).

mod common;

use common::{run, run_json};
use conveyor_tests::TestStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ages_delays_and_overlaps_of_300000_years_saturate() {
    let t = TestStore::sqlite().await;
    let url = t.url.clone();

    // A delay beyond five years is refused, as the API refuses it: bad input, no panic.
    let (code, _, err) = run(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"later"}"#,
            "--delay",
            "300000y",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid delay: 300000years is more than five years"),
        "{err}"
    );
    let job = run_json(
        &url,
        &[
            "enqueue",
            "--kind",
            "demo.echo",
            "--args",
            r#"{"msg":"later"}"#,
            "--delay",
            "4y",
        ],
    );
    assert_eq!(job["state"], "scheduled", "{job}");

    for args in [
        &["jobs", "list", "--since", "300000y"][..],
        &["dead", "list", "--until", "300000y"][..],
    ] {
        let (code, out, err) = run(&url, args);
        assert_eq!(code, 0, "conveyor {args:?}: {out}{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let listed = run_json(&url, &["jobs", "list", "--since", "300000y"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "everything is newer than 300,000 years ago: {listed}"
    );

    let ep = run_json(
        &url,
        &[
            "webhooks",
            "endpoints",
            "create",
            "--url",
            "https://example.com/hooks",
            "--event-type",
            "invoice.*",
        ],
    );
    let id = ep["id"].as_str().expect("an endpoint id").to_string();
    let (code, out, err) = run(
        &url,
        &[
            "webhooks",
            "endpoints",
            "rotate-secret",
            &id,
            "--overlap",
            "300000y",
        ],
    );
    assert_eq!(code, 0, "rotate-secret --overlap 300000y: {out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    t.cleanup().await;
}
