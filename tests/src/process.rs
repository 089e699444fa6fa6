//! A long-running child process (a `serve`, an example application) whose stderr is read
//! line by line, killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A child with its stderr collected.
pub struct Process {
    /// The child.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// The stderr lines read so far.
    pub seen: Vec<String>,
}

impl Process {
    /// Starts `cmd` with stdout discarded and stderr piped.
    pub fn spawn(mut cmd: Command) -> Process {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle` (failing after `secs`); returns it.
    pub fn wait_for_line(&mut self, needle: &str, secs: u64) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with `{needle}` within {secs}s; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in a `listening on http://ADDR` line.
pub fn listening_addr(line: &str) -> std::net::SocketAddr {
    line.rsplit("http://")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.trim_end_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}
