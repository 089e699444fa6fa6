//! The SQL migrations are embedded by `sqlx::migrate!`, which cannot tell cargo about the files
//! it reads on a stable compiler: without this, adding a migration would not rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
