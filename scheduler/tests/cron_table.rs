//! Fire times against cronie/Vixie cron, case by case: expressions × zones × DST dates, each
//! expected instant worked out by hand (weekdays from the calendar, offsets from the zone's
//! rules) and written as RFC 3339 with the zone's offset at that instant.
//!
//! 2026 calendar used below: 1 Jul is a Wednesday, 1 Sep a Tuesday; Europe/Berlin springs
//! forward on Sun 29 Mar (02:00 CET → 03:00 CEST, at 01:00Z) and falls back on Sun 25 Oct
//! (03:00 CEST → 02:00 CET, at 01:00Z); America/New_York springs forward on Sun 8 Mar
//! (02:00 EST → 03:00 EDT, at 07:00Z) and falls back on Sun 1 Nov (02:00 EDT → 01:00 EST, at
//! 06:00Z).

use chrono::{DateTime, Utc};
use conveyor_scheduler::schedule::ScheduleSpec;

struct Case {
    why: &'static str,
    cron: &'static str,
    zone: &'static str,
    after: &'static str,
    expected: &'static [&'static str],
}

const CASES: &[Case] = &[
    // Day-of-month and day-of-week, both restricted: either one matches.
    Case {
        why: "1st, 15th and every Monday",
        cron: "0 0 1,15 * MON",
        zone: "UTC",
        after: "2026-06-30T12:00:00Z",
        expected: &[
            "2026-07-01T00:00:00+00:00", // Wed, the 1st
            "2026-07-06T00:00:00+00:00", // Mon
            "2026-07-13T00:00:00+00:00", // Mon
            "2026-07-15T00:00:00+00:00", // Wed, the 15th
            "2026-07-20T00:00:00+00:00", // Mon
        ],
    },
    Case {
        why: "every 13th and every Friday, in a zone",
        cron: "0 0 13 * 5",
        zone: "Europe/Berlin",
        after: "2026-09-01T00:00:00Z",
        expected: &[
            "2026-09-04T00:00:00+02:00", // Fri
            "2026-09-11T00:00:00+02:00", // Fri
            "2026-09-13T00:00:00+02:00", // Sun, the 13th
            "2026-09-18T00:00:00+02:00", // Fri
        ],
    },
    Case {
        why: "a day-of-week starting with `*` is unrestricted: both must match",
        cron: "0 0 1 * */2",
        zone: "UTC",
        after: "2026-07-01T12:00:00Z",
        expected: &[
            "2026-08-01T00:00:00+00:00", // Sat
            "2026-09-01T00:00:00+00:00", // Tue
            "2026-10-01T00:00:00+00:00", // Thu
        ],
    },
    Case {
        why: "the 6-field form follows the same day rule",
        cron: "0 0 0 1,15 * MON",
        zone: "UTC",
        after: "2026-06-30T12:00:00Z",
        expected: &[
            "2026-07-01T00:00:00+00:00",
            "2026-07-06T00:00:00+00:00",
            "2026-07-13T00:00:00+00:00",
        ],
    },
    // Spring forward: a fixed time in the gap fires once, at the first instant after it.
    Case {
        why: "02:30 nightly, Berlin spring-forward night",
        cron: "30 2 * * *",
        zone: "Europe/Berlin",
        after: "2026-03-28T12:00:00Z",
        expected: &["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
    },
    Case {
        why: "02:30 nightly, New York spring-forward night",
        cron: "30 2 * * *",
        zone: "America/New_York",
        after: "2026-03-07T12:00:00Z",
        expected: &["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
    },
    Case {
        why: "two fixed times in the gap fire once, together",
        cron: "0,30 2 * * *",
        zone: "Europe/Berlin",
        after: "2026-03-28T12:00:00Z",
        expected: &[
            "2026-03-29T03:00:00+02:00",
            "2026-03-30T02:00:00+02:00",
            "2026-03-30T02:30:00+02:00",
        ],
    },
    Case {
        why: "seconds-first form, fixed time in the gap",
        cron: "0 30 2 * * *",
        zone: "Europe/Berlin",
        after: "2026-03-28T12:00:00Z",
        expected: &["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
    },
    Case {
        why: "a wildcard hour has nothing to catch up: the gap's times do not exist",
        cron: "*/15 * * * *",
        zone: "Europe/Berlin",
        after: "2026-03-29T00:40:00Z",
        expected: &[
            "2026-03-29T01:45:00+01:00",
            "2026-03-29T03:00:00+02:00",
            "2026-03-29T03:15:00+02:00",
        ],
    },
    // Fall back: fixed times once (first occurrence), wildcard/range/step hours at every
    // real occurrence.
    Case {
        why: "01:30 nightly, New York fall-back night: once, EDT",
        cron: "30 1 * * *",
        zone: "America/New_York",
        after: "2026-10-31T12:00:00Z",
        expected: &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    },
    Case {
        why: "every 15 minutes through New York's repeated hour",
        cron: "*/15 * * * *",
        zone: "America/New_York",
        after: "2026-11-01T05:40:00Z",
        expected: &[
            "2026-11-01T01:45:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:15:00-05:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T01:45:00-05:00",
            "2026-11-01T02:00:00-05:00",
        ],
    },
    Case {
        why: "starting inside the second pass of the repeated hour",
        cron: "*/15 * * * *",
        zone: "America/New_York",
        after: "2026-11-01T06:20:00Z",
        expected: &[
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T01:45:00-05:00",
            "2026-11-01T02:00:00-05:00",
        ],
    },
    Case {
        why: "an hour range runs in both passes of the repeated hour",
        cron: "30 1-2 * * *",
        zone: "America/New_York",
        after: "2026-11-01T05:00:00Z",
        expected: &[
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T02:30:00-05:00",
        ],
    },
    Case {
        why: "hourly through Berlin's repeated hour",
        cron: "0 * * * *",
        zone: "Europe/Berlin",
        after: "2026-10-24T23:30:00Z",
        expected: &[
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T03:00:00+01:00",
        ],
    },
    Case {
        why: "02:30 nightly, Berlin fall-back night: once, CEST",
        cron: "30 2 * * *",
        zone: "Europe/Berlin",
        after: "2026-10-24T12:00:00Z",
        expected: &["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    },
];

#[test]
fn fire_times_match_vixie_cron() {
    let mut wrong = Vec::new();
    for case in CASES {
        let mut spec = ScheduleSpec::new("table", case.cron, "k");
        spec.timezone = case.zone.into();
        let schedule = spec.compile().unwrap();
        let after: DateTime<Utc> = DateTime::parse_from_rfc3339(case.after)
            .unwrap()
            .with_timezone(&Utc);
        let got: Vec<String> = schedule
            .next(after, case.expected.len())
            .iter()
            .map(|t| t.to_rfc3339())
            .collect();
        if got != case.expected {
            wrong.push(format!(
                "{} (`{}` in {} after {}):\n  expected {:?}\n  got      {:?}",
                case.why, case.cron, case.zone, case.after, case.expected, got
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
