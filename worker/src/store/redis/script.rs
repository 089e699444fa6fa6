//! The Lua scripts, one per step that touches more than one key (the `*.lua` files beside
//! this one). Every queue script is `prelude.lua` (shared helpers: scores, state sets) followed
//! by its own file; the key scripts stand alone.

use std::sync::LazyLock;

use ::redis::Script;

macro_rules! queue_script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("prelude.lua"),
                "\n",
                include_str!($file)
            ))
        })
    };
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
pub(super) static KEY_KEEP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("key_keep.lua")));
pub(super) static KEY_FREE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("key_free.lua")));

pub(super) fn all_scripts() -> [&'static Script; 12] {
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
        &KEY_KEEP,
        &KEY_FREE,
    ]
}
