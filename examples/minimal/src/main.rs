//! The smallest application with its own job kind: `greet`, run by the whole platform.
//!
//! `minimal serve` runs the API, the workers (with `greet` and the built-in kinds) and the
//! scheduler; `minimal enqueue --kind greet --args '{"name":"Ada"}'` enqueues one, and every
//! other `conveyor` command works the same. See docs/own-jobs.md.

use conveyor::{App, Handler, JobArgs, JobContext, Outcome};
use serde::{Deserialize, Serialize};

/// Greets someone: the args of the `greet` kind.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Greet {
    /// Who.
    pub name: String,
}

impl JobArgs for Greet {
    const KIND: &'static str = "greet";
    const MAX_ATTEMPTS: i32 = 3;
}

impl Handler for Greet {
    async fn run(self, ctx: JobContext) -> anyhow::Result<Outcome> {
        if self.name.trim().is_empty() {
            // Retrying cannot help: fail for good.
            return Ok(Outcome::fail("nobody to greet: `name` is blank"));
        }
        tracing::info!(job.id = %ctx.job.id, "hello, {}", self.name);
        Ok(Outcome::Done)
    }
}

fn main() -> std::process::ExitCode {
    App::new().kind::<Greet>().run()
}

#[cfg(test)]
mod tests {
    use conveyor::JobState;
    use conveyor::testing::run_inline;

    use super::Greet;

    #[tokio::test]
    async fn greets_and_refuses_a_blank_name_for_good() {
        let done = run_inline(Greet { name: "Ada".into() }).await;
        assert_eq!(done.state(), JobState::Completed);
        let blank = run_inline(Greet { name: " ".into() }).await;
        assert_eq!(blank.state(), JobState::Dead);
        assert_eq!(blank.error(), Some("nobody to greet: `name` is blank"));
    }
}
