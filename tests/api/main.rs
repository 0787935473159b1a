//! Black-box tests of the `proxmoxer` daemon: one test binary, many modules.

mod fake_pve;
mod fake_pve_selftest;
mod helpers;
mod monitoring;
mod persistence;
mod registration;
mod tokens;
