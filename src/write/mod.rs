//! The write path: everything that runs inside the application's own
//! transaction.
//!
//! - [`emit`]: `outbox_emit` / `outbox.emit`, argument checks and the
//!   choice of the current events table;
//! - [`capture`]: the row trigger behind `outbox.capture()`, which turns a
//!   row change into an event and writes it like `emit` does;
//! - [`heap`]: the event row and its index entries written directly,
//!   without the executor;
//! - [`commit`]: the transaction callback that gives the transaction its
//!   place in the commit order and wakes the worker after commit.
//!
//! None of it runs SQL with more rights than the caller (docs/security.md).

pub mod capture;
pub mod commit;
pub mod emit;
pub mod heap;
