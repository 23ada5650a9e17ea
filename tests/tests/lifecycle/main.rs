//! Lifecycle tests of a generation ("Generation lifecycle"): the fleet's
//! real binaries as separate processes (ingress, two workers,
//! billing-worker) against PostgreSQL, RabbitMQ and the in-process fakes,
//! with workers crashed (SIGKILL), frozen (SIGSTOP/SIGCONT) and shut down
//! (SIGTERM) mid-stream.
//!
//! Every test gets databases and a broker prefix of its own and removes them
//! at the end, passed or not; every wait has a timeout. The binaries are
//! built once per test process (`cargo build --bins`, a no-op when up to
//! date) unless `LIFECYCLE_BIN_DIR` points at prebuilt ones. Process logs
//! of a failed test stay in `target/tmp/lifecycle/<test>/` and are named in
//! its error.
//!
//! Tests marked `#[ignore = "product bug: …"]` show a bug found while
//! writing these; they fail until it is fixed (`--run-ignored only`).
//!
//! # Layout
//! - [`fleet_tests::harness::lifecycle`]: starting the fleet and the fakes,
//!   look-ups, waits, clean-up.
//! - [`failover`]: SIGKILL, SIGSTOP and SIGTERM of the worker holding a lease.
//! - [`books`]: a worker killed after its stream ended, before `finalize`
//!   committed: the call is booked anyway (estimated, charged to nobody).
//! - [`stop`]: `/stop` closes the stream within a second.
//! - [`order`]: messages of one chat are generated one at a time, in update order.
//! - [`repair`]: a corrupt stored conversation row is left out; `/new` starts afresh.
//! - [`resume`]: an answer stored by a crashed attempt is delivered, not generated again.
//! - [`rounds`]: a job handed back after a paid tool round resumes from the stored round.

mod books;
mod failover;
mod order;
mod poison;
mod repair;
mod resume;
mod rounds;
mod stop;

/// The slow, long answer (96 events, 1,430 characters of plain text).
pub const ESSAY: &str = "anthropic/essay_slow.sse";
/// Chi asks for the essay.
pub const CHI_ESSAY: &str = "telegram/chi_essay.json";
/// Chi sends `/stop`.
pub const CHI_STOP: &str = "telegram/chi_stop.json";
