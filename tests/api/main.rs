//! Black-box tests of the `proxmoxer` daemon: one test binary, many modules.

mod bench;
mod fake_pve;
mod fake_pve_selftest;
mod helpers;
mod members;
mod monitoring;
mod operations;
mod persistence;
mod reads;
mod registration;
mod schemathesis;
mod tls;
mod tokens;
mod writes;
