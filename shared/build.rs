//! Rebuild when a migration changes: `sqlx::migrate!` embeds them, but does
//! not tell cargo to watch the folders.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
