//! The Lua scripts, one per step that touches more than one key (the `*.lua` files beside
//! this one). Every queue script is the operator actions' start states ([`action_states_lua`],
//! built from [`OperatorAction`]), then `prelude.lua` (shared helpers: scores, state sets),
//! then its own file; the key scripts stand alone.

use std::sync::LazyLock;

use ::redis::Script;

use crate::job::{JobState, OperatorAction};

macro_rules! queue_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(&format!(
                "{}\n{}\n{}",
                action_states_lua(),
                include_str!("prelude.lua"),
                include_str!($file)
            ))
        })
    };
}

/// The Lua table `FROM`: per operator action (`FROM.retry`, `FROM.cancel`, …) the set of
/// states it may start from, and cancel's split into `FROM.cancel_at_once` and
/// `FROM.cancel_by_request`. Scripts test `FROM.retry[h.state]`; the states are written
/// nowhere else.
pub(super) fn action_states_lua() -> String {
    let set = |states: &[JobState]| {
        let members: Vec<String> = states
            .iter()
            .map(|s| format!("{} = true", s.as_str()))
            .collect();
        format!("{{ {} }}", members.join(", "))
    };
    let mut lua = String::from("local FROM = {\n");
    for action in OperatorAction::ALL {
        lua += &format!("  {} = {},\n", action.as_str(), set(action.from_states()));
    }
    lua += &format!(
        "  cancel_at_once = {},\n  cancel_by_request = {},\n}}\n",
        set(OperatorAction::CANCEL_AT_ONCE),
        set(OperatorAction::CANCEL_BY_REQUEST)
    );
    lua
}

pub(super) static FETCH: LazyLock<Script> = queue_script!("fetch.lua");
pub(super) static FINISH: LazyLock<Script> = queue_script!("finish.lua");
pub(super) static HEARTBEAT: LazyLock<Script> = queue_script!("heartbeat.lua");
pub(super) static RESCUE_SCAN: LazyLock<Script> = queue_script!("rescue_scan.lua");
pub(super) static CANCEL: LazyLock<Script> = queue_script!("cancel.lua");
pub(super) static RETRY: LazyLock<Script> = queue_script!("retry.lua");
pub(super) static DELETE: LazyLock<Script> = queue_script!("delete.lua");
pub(super) static PRUNE: LazyLock<Script> = queue_script!("prune.lua");
pub(super) static PROMOTE: LazyLock<Script> = queue_script!("promote.lua");
pub(super) static STATS: LazyLock<Script> = queue_script!("stats.lua");
pub(super) static FINISHED: LazyLock<Script> = queue_script!("finished.lua");
pub(super) static PROGRESS: LazyLock<Script> = queue_script!("progress.lua");
pub(super) static KEY_KEEP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("key_keep.lua")));
pub(super) static KEY_FREE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("key_free.lua")));

pub(super) fn all_scripts() -> [&'static Script; 13] {
    [
        &FETCH,
        &FINISH,
        &HEARTBEAT,
        &RESCUE_SCAN,
        &CANCEL,
        &RETRY,
        &DELETE,
        &PRUNE,
        &PROMOTE,
        &STATS,
        &PROGRESS,
        &KEY_KEEP,
        &KEY_FREE,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sets `FROM.<name>` in the generated Lua, read back.
    fn lua_set(lua: &str, name: &str) -> Vec<JobState> {
        let line = lua
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} = ")))
            .unwrap_or_else(|| panic!("no `{name}` in {lua}"));
        let inner = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map(|(inner, _)| inner)
            .unwrap();
        inner
            .split(',')
            .map(|m| m.trim().strip_suffix(" = true").unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn lua_state_sets_are_the_definition() {
        let lua = action_states_lua();
        for action in OperatorAction::ALL {
            assert_eq!(lua_set(&lua, action.as_str()), action.from_states());
        }
        assert_eq!(
            lua_set(&lua, "cancel_at_once"),
            OperatorAction::CANCEL_AT_ONCE
        );
        assert_eq!(
            lua_set(&lua, "cancel_by_request"),
            OperatorAction::CANCEL_BY_REQUEST
        );
        // The operator scripts decide by these sets alone: no comparison of a state of their own.
        for (file, text) in [
            ("retry.lua", include_str!("retry.lua")),
            ("cancel.lua", include_str!("cancel.lua")),
            ("delete.lua", include_str!("delete.lua")),
        ] {
            for line in text.lines().filter(|l| !l.trim_start().starts_with("--")) {
                assert!(
                    !line.contains("state ==")
                        && !line.contains("state ~=")
                        && !line.contains("is_waiting"),
                    "{file} decides by a state of its own: {line}"
                );
            }
        }
    }
}
