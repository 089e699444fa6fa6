//! Writing to the terminal without ever taking the process down.
//!
//! Rust ignores `SIGPIPE`, so a write to a pipe whose reader went away fails with
//! `BrokenPipe`, and `outln!`/`errln!` turn that failure into a panic. A worker must keep
//! running when its log shipper restarts, and `conveyor jobs list | head -1` must end quietly:
//! - [`LogWriter`]: where log lines go. A line that cannot be written is dropped; the process
//!   and its jobs carry on.
//! - [`outln!`]: a command's output on stdout. When the reader has gone the command stops
//!   there, with the status a shell gives a process ended by `SIGPIPE` (141), as `cat` would.
//! - [`errln!`]: a message on stderr, dropped when nobody reads it.

use std::fmt;
use std::io::{self, Write};

/// Exit status of a command whose output reader went away: 128 + SIGPIPE, as shells report it.
pub const BROKEN_PIPE_STATUS: i32 = 141;

/// Writes one line of command output to stdout.
pub fn out(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        // Anything else (a full disk under a redirect) is reported where it can be.
        err(format_args!("error: cannot write output: {e}"));
        std::process::exit(1);
    }
}

/// Writes one line to stderr, ignoring a reader that went away.
pub fn err(args: fmt::Arguments<'_>) {
    let mut stderr = io::stderr().lock();
    let _ = stderr
        .write_fmt(args)
        .and_then(|()| stderr.write_all(b"\n"));
}

/// `outln!` that ends the command quietly when stdout's reader has gone.
macro_rules! outln {
    () => { $crate::console::out(format_args!("")) };
    ($($arg:tt)*) => { $crate::console::out(format_args!($($arg)*)) };
}

/// `errln!` that never panics.
macro_rules! errln {
    ($($arg:tt)*) => { $crate::console::err(format_args!($($arg)*)) };
}

/// The log writer: stderr, where a failed write drops the line instead of failing the
/// subscriber (whose own error report would be an `errln!`, a panic on a closed pipe).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One event is one `write_all` of a formatted line; a short write is finished here
        // so lines from several threads do not interleave mid-line.
        let _ = io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().lock().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_writer_reports_every_byte_written() {
        let mut w = LogWriter;
        assert_eq!(w.write(b"a line\n").unwrap(), 7);
        w.flush().unwrap();
    }
}
