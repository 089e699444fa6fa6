//! The `conveyor` binary: the platform with its built-in kinds. See `conveyor --help`, and
//! the README for a tour.

fn main() -> std::process::ExitCode {
    conveyor::App::new().run()
}
