//! The terminal commands that ask a running daemon over its API: `proxmoxer status` (a table
//! and a Nagios-style exit code) and `proxmoxer watch` (a line per change, live).
//!
//! - [`client`]: where the daemon is, its token, and what went wrong when it does not answer.
//! - [`verdict`]: the worst-first order and the overall verdict of a set of clusters.
//! - [`paint`]: colours on a terminal, plain text elsewhere.
//! - [`sse`]: a parser for the server-sent events stream.
//! - [`status`] and [`watch`]: the two commands.

pub mod client;
pub mod paint;
pub mod sse;
pub mod status;
pub mod verdict;
pub mod watch;
